"""Importing torchvision's weights without torch: ``.safetensors`` files (timm's ``resnet*.tv_in1k`` copies, same
keys as torchvision) and torchvision's zip ``.pth`` state_dicts, into the ImageNet zoo; the safetensors header
checks (hostile headers refused with one error type, one line, within 1 GiB of address space; a hypothesis fuzz).

The weights are the ImageNet parity fixture's (regenerated from names, see fixtures/imagenet_parity_common.py),
whose logits tests/test_models_imagenet.py compares with torchvision's: here the files must give the same
variables as that state_dict.
"""
import collections
import json
import struct
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_torch_reader as craft
from conftest import FIXTURES
from kdjax.checkpoint import (CheckpointMismatch, SafetensorsFileError, import_torch, read_torch_checkpoint,
                              torch_to_variables)
from kdjax.checkpoint import safetensors_reader

sys.path.insert(0, str(FIXTURES))
import imagenet_parity_common as common  # noqa: E402

SHAPES = json.loads((FIXTURES / "imagenet_state_dict_shapes.json").read_text())
CASE = "resnet18_c10_s64"


@pytest.fixture(scope="module")
def reference():
    """(state_dict, variables) of the fixture's resnet18 (10 classes), through the in-memory import."""
    state_dict = common.state_dict(SHAPES[CASE])
    return state_dict, torch_to_variables(state_dict, "resnet18_imagenet", 10, 64)


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def torchvision_pth(state_dict) -> bytes:
    """``torch.save(model.state_dict())`` of torchvision (zip serialisation, one storage per tensor)."""
    tensors, storages = collections.OrderedDict(), {}
    for i, (key, value) in enumerate(state_dict.items()):
        storage = "LongStorage" if value.dtype == np.int64 else "FloatStorage"
        strides = tuple(int(np.prod(value.shape[d + 1:])) for d in range(value.ndim))
        tensors[key] = craft.Tensor(str(i), value.size, tuple(value.shape), strides, storage=storage)
        storages[str(i)] = np.ascontiguousarray(value).tobytes()
    return craft.zip_checkpoint(craft.pickle_of(tensors), storages, prefix="resnet18-f37072fd")


# ------------------------------------------------------------------------------------------- good files


def test_timm_safetensors_file_imports_as_the_state_dict(tmp_path, reference):
    state_dict, variables = reference
    path = tmp_path / "model.safetensors"  # the name of timm's file in its resnet18.tv_in1k folder
    floats = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}  # timm drops them
    safetensors.numpy.save_file(floats, str(path), metadata={"format": "pt"})
    read, info = read_torch_checkpoint(path)
    assert info["format"] == "safetensors" and info["metadata"] == {"format": "pt"}
    assert sorted(read) == sorted(floats)
    assert_same_variables(import_torch(path, "resnet18_imagenet", 10, 64), variables)


@pytest.mark.parametrize("name", ["resnet18-f37072fd.pth", "resnet18-5c106cde.pth"])
def test_torchvision_pth_imports_as_the_state_dict(tmp_path, reference, name):
    """torchvision's older (``-5c106cde``) and newer file names hold the same keys; a bare state_dict."""
    state_dict, variables = reference
    path = craft.write(tmp_path, name, torchvision_pth(state_dict))
    read, info = read_torch_checkpoint(path)
    assert info["format"] == "zip" and info["entries"] == [] and list(read) == list(state_dict)
    assert_same_variables(import_torch(path, "resnet18_imagenet", 10, 64), variables)


def test_a_mismatched_safetensors_file_names_the_first_bad_key(tmp_path, reference):
    state_dict, _ = reference
    wrong = dict(state_dict, **{"fc.weight": np.zeros((1000, 512), np.float32), "fc.bias": np.zeros(1000, np.float32)})
    path = tmp_path / "wrong_classes.safetensors"
    safetensors.numpy.save_file(wrong, str(path))
    with pytest.raises(CheckpointMismatch, match=r"wrong_classes\.safetensors: .*'fc\.(weight|bias)' has shape") as e:
        import_torch(path, "resnet18_imagenet", 10, 64)
    assert "\n" not in str(e.value)
    extra = dict(state_dict, **{"head.weight": np.zeros((3, 3), np.float32)})
    safetensors.numpy.save_file(extra, str(path))
    with pytest.raises(CheckpointMismatch, match=r"'head\.weight' \(3, 3\) has no counterpart"):
        import_torch(path, "resnet18_imagenet", 10, 64)


# ----------------------------------------------------------------------------------------- bad headers


def safetensors_bytes(header, data: bytes = b"", declared_length=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_length is None else declared_length
    return struct.pack("<Q", length) + raw + data


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


BAD_FILES = {
    "empty": b"",
    "huge_header_length": struct.pack("<Q", 2 ** 63) + b"{}",
    "header_longer_than_file": safetensors_bytes({"a": entry()}, bytes(8), declared_length=10 ** 6),
    "not_json": safetensors_bytes(b"\x80\x02torch pickle?"),
    "not_an_object": safetensors_bytes([1, 2]),
    "huge_shape": safetensors_bytes({"a": entry(shape=(2 ** 40, 2 ** 40), end=8)}, bytes(8)),
    "huge_offsets": safetensors_bytes({"a": entry(shape=(2 ** 61,), begin=0, end=2 ** 63)}, bytes(8)),
    "overlapping": safetensors_bytes({"a": entry(begin=0, end=8), "b": entry(begin=4, end=12)}, bytes(12)),
    "gap": safetensors_bytes({"a": entry(begin=0, end=8), "b": entry(begin=12, end=20)}, bytes(20)),
    "truncated_data": safetensors_bytes({"a": entry(begin=0, end=8), "b": entry(begin=8, end=16)}, bytes(12)),
    "trailing_data": safetensors_bytes({"a": entry(begin=0, end=8)}, bytes(16)),
    "duplicate_key": safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                       b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', bytes(16)),
    "unknown_dtype": safetensors_bytes({"a": entry(dtype="F128")}, bytes(8)),
    "bfloat16": safetensors_bytes({"a": entry(dtype="BF16", end=4)}, bytes(4)),
    "negative_size": safetensors_bytes({"a": entry(shape=(-2,))}, bytes(8)),
    "float_offsets": safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}', bytes(8)),
    "deep_nesting": safetensors_bytes(b"[" * 100000 + b"]" * 100000),
    "bad_metadata": safetensors_bytes({"__metadata__": {"a": 1}}),
    "too_many_dims": safetensors_bytes({"a": entry(shape=(1,) * 40, end=4)}, bytes(4)),
    "not_utf8": safetensors_bytes(b'{"\xff": 1}'),
}


@pytest.fixture(scope="module")
def bad_outcomes(tmp_path_factory):
    """Every bad file read once, in one process limited to 1 GiB of address space."""
    directory = tmp_path_factory.mktemp("bad_safetensors")
    paths = [craft.write(directory, f"{name}.safetensors", data) for name, data in BAD_FILES.items()]
    return {p.name.removesuffix(".safetensors"): (p, outcome) for p, outcome in
            zip(paths, craft.load_limited(paths).values())}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_safetensors_file_raises_one_error_in_one_line(bad_outcomes, name):
    path, (error, message) = bad_outcomes[name]
    assert error == "SafetensorsFileError", (error, message[:500])
    craft.check_message(SafetensorsFileError(message), path)


def test_bfloat16_names_the_fix(tmp_path):
    path = craft.write(tmp_path, "bf16.safetensors", BAD_FILES["bfloat16"])
    with pytest.raises(SafetensorsFileError, match="float32"):
        read_torch_checkpoint(path)


# ------------------------------------------------------------------------------------------------ fuzz

DTYPE_NAMES = sorted(safetensors_reader.DTYPES)
HOSTILE_SIZES = st.one_of(st.integers(-2, 6), st.integers(0, 2 ** 64), st.just(2 ** 63 - 1))
MUTATIONS = ["none", "none", "none", "shape", "offset", "dtype", "declared_length", "duplicate", "cut", "extra_data",
             "metadata"]


@st.composite
def fuzzed_files(draw):
    """A well-formed file of up to four small tensors (tiling the data, in random order), then at most one lie:
    a shape, an offset, a dtype, the header length, a repeated name, a cut, data past the end, bad metadata."""
    names = draw(st.lists(st.sampled_from(["a", "b", "conv1.weight", "fc.bias", "module.x"]), max_size=4,
                          unique=True))
    entries, position = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(safetensors_reader.DTYPES[dtype]).itemsize
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    data = draw(st.binary(min_size=position, max_size=position))
    items = draw(st.permutations(list(entries.items())))
    mutation = draw(st.sampled_from(MUTATIONS))
    if items and mutation in ("shape", "offset", "dtype", "duplicate"):
        i = draw(st.integers(0, len(items) - 1))
        name, spec = items[i]
        spec = dict(spec)
        if mutation == "shape":
            spec["shape"] = draw(st.lists(HOSTILE_SIZES, max_size=4))
        elif mutation == "offset":
            spec["data_offsets"] = [draw(HOSTILE_SIZES), draw(HOSTILE_SIZES)]
        elif mutation == "dtype":
            spec["dtype"] = draw(st.sampled_from(["BF16", "F8_E4M3", "f32", 7]))
        items[i] = (name, spec)
        if mutation == "duplicate":
            items.append((name, items[i][1]))
    if mutation == "metadata":
        items.append(("__metadata__", draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x"]))))
    header = ("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}").encode()
    header += b" " * draw(st.integers(0, 7))  # the writer's padding to 8 bytes
    declared = draw(st.integers(0, 2 ** 64 - 1)) if mutation == "declared_length" else len(header)
    if mutation == "extra_data":
        data += draw(st.binary(min_size=1, max_size=16))
    whole = struct.pack("<Q", declared) + header + data
    return whole[:draw(st.integers(0, len(whole) - 1))] if mutation == "cut" else whole


@settings(max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(fuzzed_files())
def test_fuzzed_headers_are_read_or_refused_with_one_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        state_dict, _ = read_torch_checkpoint(path)
    except SafetensorsFileError as e:
        craft.check_message(e, path)
        return
    header, length = safetensors_reader.read_header(str(path))
    assert len(state_dict) == len(header) - ("__metadata__" in header)
    for name, value in state_dict.items():
        spec = header[name] if name in header else header["module." + name]  # the DataParallel prefix goes
        assert list(value.shape) == spec["shape"]
        begin, end = spec["data_offsets"]
        assert value.tobytes() == data[8 + length + begin:8 + length + end]

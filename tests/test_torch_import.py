"""Reading PyTorch checkpoints without torch: both serialisations, every dtype, the checkpoint dict and bare
state_dicts, ``module.`` prefixes, refusal of code-running pickles, truncated and foreign files, and mismatches
between a checkpoint and the architecture it is imported into.

The ``torch_reader_*`` fixtures come from ``fixtures/make_torch_reader_fixtures.py`` (PyTorch 2.13);
``torch_reader_expected.npz`` is what ``torch.load`` returned for their tensors. That the teacher fixtures are
read exactly is shown end to end by tests/test_torch_parity.py: the imported models reproduce the original's
logits and features stored in ``*_io.npz``.
"""
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from kdjax.checkpoint import (CheckpointMismatch, NotATorchCheckpointError, TorchCheckpointError,
                              TruncatedCheckpointError, UnsafePickleError, import_torch, read_torch_checkpoint)
from kdjax.checkpoint import torch_pickle
from conftest import FIXTURES

TEACHERS = ["resnet8", "wrn_16_1"]
FORMATS = ["zip", "legacy"]
LEGACY_HEADER = (pickle.dumps(torch_pickle.LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
                 + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))


def teacher_path(arch, fmt):
    return FIXTURES / f"{arch}_c100_s32{'_legacy' if fmt == 'legacy' else ''}.pth"


def one_line(err):
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- reading values


@pytest.mark.parametrize("arch", TEACHERS)
def test_teacher_serialisations_agree_and_match_the_original_layout(arch):
    (zip_sd, zip_info), (leg_sd, leg_info) = (read_torch_checkpoint(teacher_path(arch, f)) for f in FORMATS)
    layout = json.loads((FIXTURES / "state_dict_keys.json").read_text())[arch]
    assert [[k, list(v.shape)] for k, v in zip_sd.items()] == layout
    assert list(leg_sd) == list(zip_sd)
    for key, value in zip_sd.items():
        assert value.dtype == leg_sd[key].dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32)
        np.testing.assert_array_equal(value, leg_sd[key])
    for info, fmt in ((zip_info, "zip"), (leg_info, "legacy")):
        assert info["format"] == fmt and info["entries"] == ["epoch", "model", "accuracy", "optimizer"]
        assert info["epoch"] == 240 and type(info["epoch"]) is int
        assert type(info["accuracy"]) is float and info["accuracy"] == zip_info["accuracy"]
        assert info["stripped_prefix"] is False and "optimizer" not in info


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_view_and_offset_equals_torch(fmt):
    obj = torch_pickle.load(FIXTURES / f"torch_reader_dtypes_{fmt}.pth")
    expected = np.load(FIXTURES / "torch_reader_expected.npz")
    tensors = obj["tensors"]
    assert list(tensors) == list(expected.files)
    for name in expected.files:
        got = tensors[name]
        if name == "bf16":
            assert str(got.dtype) == "bfloat16"
            got = got.astype(np.float32)
        assert got.dtype == expected[name].dtype and got.shape == expected[name].shape, name
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
        assert got.flags["C_CONTIGUOUS"] and got.flags["OWNDATA"], name
    np.testing.assert_array_equal(tensors["transposed"], expected["base"].T)
    np.testing.assert_array_equal(tensors["offset_slice"], expected["base"][1:, 2:5])
    assert type(obj["np_f64"]) is np.float64 and obj["np_f64"] == 61.25
    assert type(obj["np_f32"]) is np.float32 and obj["np_f32"] == -0.5
    assert type(obj["np_i64"]) is np.int64 and obj["np_i64"] == 240


@pytest.mark.parametrize("fmt", FORMATS)
def test_student_checkpoint_with_module_prefix_equals_bare_state_dict(fmt):
    sd, info = read_torch_checkpoint(FIXTURES / f"torch_reader_student_{fmt}.pth")
    bare, bare_info = read_torch_checkpoint(FIXTURES / f"torch_reader_bare_{fmt}.pth")
    raw = torch_pickle.load(FIXTURES / f"torch_reader_student_{fmt}.pth")["model"]
    assert all(k.startswith("module.") for k in raw)
    assert list(sd) == [k[len("module."):] for k in raw] == list(bare)
    for key in sd:
        np.testing.assert_array_equal(sd[key], raw["module." + key])
        np.testing.assert_array_equal(sd[key], bare[key])
    assert info["stripped_prefix"] is True and bare_info["stripped_prefix"] is False
    assert (info["epoch"], info["accuracy"], info["ExpID"]) == (3, 61.25, "SERVER-000")
    assert "optimizer" not in info and info["entries"] == ["epoch", "model", "accuracy", "optimizer", "ExpID"]
    assert (bare_info["epoch"], bare_info["accuracy"], bare_info["entries"]) == (None, None, [])
    # the SGD momentum buffers are read too (one per parameter), though import ignores them
    opt = torch_pickle.load(FIXTURES / f"torch_reader_student_{fmt}.pth")["optimizer"]
    buffers = [s["momentum_buffer"] for s in opt["state"].values()]
    assert [b.shape for b in buffers] == [v.shape for k, v in sd.items() if k.endswith(("weight", "bias"))]
    assert opt["param_groups"][0]["momentum"] == 0.9


def test_module_prefixed_teacher_imports_like_the_original(tmp_path):
    """A DataParallel-style resnet8 checkpoint (every key 'module.'-prefixed) imports to the same variables."""
    path = tmp_path / "prefixed.pth"
    path.write_bytes(_rewrite_zip_pickle(teacher_path("resnet8", "zip"), _prefix_model_keys))
    sd, info = read_torch_checkpoint(path)
    assert info["stripped_prefix"] is True
    got = import_torch(path, "resnet8", 100)
    want = import_torch(teacher_path("resnet8", "zip"), "resnet8", 100)
    _assert_trees_equal(got, want)


# ------------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("arch", TEACHERS)
def test_import_places_every_tensor(arch):
    sd, _ = read_torch_checkpoint(teacher_path(arch, "legacy"))
    variables = import_torch(teacher_path(arch, "zip"), arch, 100)
    params = _flat(variables["params"])
    stats = _flat(variables["batch_stats"])
    counts = json.loads((FIXTURES / "param_counts.json").read_text())
    assert sum(v.size for v in params.values()) == counts[arch]["100"]
    kept = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(params) + len(stats) == len(kept)
    # spot checks of the layout rule: conv OIHW -> HWIO, BN running stats -> batch_stats, linear [out,in] -> [in,out]
    np.testing.assert_array_equal(params["conv1/kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc/kernel"], sd["fc.weight"].T)
    bn, bn_torch = ("bn1", "bn1") if arch == "resnet8" else ("block1/layer_0/bn1", "block1.layer.0.bn1")
    np.testing.assert_array_equal(stats[f"{bn}/var"], sd[f"{bn_torch}.running_var"])
    np.testing.assert_array_equal(params[f"{bn}/scale"], sd[f"{bn_torch}.weight"])
    assert all(v.dtype == np.float32 for v in list(params.values()) + list(stats.values()))


def test_wrong_architecture_names_the_first_mismatch():
    path = teacher_path("resnet8", "zip")
    with pytest.raises(CheckpointMismatch) as err:
        import_torch(path, "resnet8", 10)
    msg = one_line(err)
    assert str(path) in msg and "'fc.weight'" in msg and "(100, 64)" in msg and "(64, 10)" in msg
    with pytest.raises(CheckpointMismatch) as err:  # deeper net: the first block resnet8 lacks
        import_torch(path, "resnet14", 100)
    msg = one_line(err)
    assert str(path) in msg and "layer1_1/" in msg and "lacks" in msg
    with pytest.raises(CheckpointMismatch) as err:  # conv1 fits both; wrn's first block does not exist in resnet8
        import_torch(teacher_path("wrn_16_1", "legacy"), "resnet8", 100)
    msg = one_line(err)
    assert "'block1.layer.0.bn1.weight'" in msg and "no counterpart" in msg
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet8"):
        import_torch(path, "resnet9", 100)


# ---------------------------------------------------------------------------------------- refusing files


class _RunsCommand:
    """Pickles as a call of os.system: an unrestricted unpickler would run the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_data_pkl(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["bare_pickle", "legacy", "zip", "inside_state_dict"])
def test_code_running_pickle_is_refused_naming_the_global(tmp_path, layout):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"model": {"conv1.weight": _RunsCommand(marker)}}, protocol=2)
    payload = {"bare_pickle": evil, "legacy": LEGACY_HEADER + evil, "zip": _zip_with_data_pkl(evil),
               "inside_state_dict": _rewrite_zip_pickle(teacher_path("resnet8", "zip"),
                                                        lambda obj: _inject(obj, marker))}[layout]
    path = tmp_path / "evil.pth"
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as err:
        read_torch_checkpoint(path)
    msg = one_line(err)
    assert f"'{os.system.__module__}.system'" in msg and str(path) in msg
    assert not marker.exists()


def test_other_globals_and_misused_allowed_ones_are_refused(tmp_path):
    path = tmp_path / "eval.pth"
    path.write_bytes(LEGACY_HEADER + b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafePickleError, match="'builtins.eval'"):
        read_torch_checkpoint(path)
    # numpy.dtype is allowed for numeric scalars only: an object dtype is refused
    path.write_bytes(LEGACY_HEADER + b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R.")
    with pytest.raises(UnsafePickleError, match="numpy.dtype"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.999])
def test_truncated_file(tmp_path, fmt, fraction):
    data = teacher_path("resnet8", fmt).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(TruncatedCheckpointError) as err:
        read_torch_checkpoint(path)
    msg = one_line(err)
    assert str(path) in msg and "truncated" in msg and "again" in msg


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(TruncatedCheckpointError, match="empty"):
        read_torch_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_torch_checkpoint(tmp_path / "nowhere.pth")


def test_files_that_are_not_checkpoints(tmp_path):
    cases = {
        "notes.pth": b"epoch 240, accuracy 72.3\n",
        "plain_pickle.pth": pickle.dumps({"epoch": 3, "model": {}}, protocol=2),
        "arrays.npz": None,  # a zip archive, but no torch one
        "list.pth": LEGACY_HEADER + pickle.dumps([1, 2, 3], protocol=2) + pickle.dumps([], protocol=2),
        "no_weights.pth": LEGACY_HEADER + pickle.dumps({"epoch": 3, "lr": 0.1}, protocol=2)
        + pickle.dumps([], protocol=2),
    }
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    expect = {"notes.pth": "not a PyTorch checkpoint", "plain_pickle.pth": "magic number",
              "arrays.npz": "data.pkl", "list.pth": "holds a list", "no_weights.pth": "neither a 'model'"}
    for name, payload in cases.items():
        path = tmp_path / name
        if payload is not None:
            path.write_bytes(payload)
        with pytest.raises(NotATorchCheckpointError) as err:
            read_torch_checkpoint(path)
        msg = one_line(err)
        assert str(path) in msg and expect[name] in msg, msg
        assert "torch.save" in msg or "state_dict()" in msg, msg  # the fix
    assert issubclass(NotATorchCheckpointError, TorchCheckpointError) and issubclass(TorchCheckpointError, ValueError)


def test_corrupt_storage_is_reported(tmp_path):
    """A tensor whose view would reach past its storage is refused before NumPy reads any memory."""
    src = teacher_path("resnet8", "zip")
    path = tmp_path / "short_storage.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data/0"):
                data = data[:-4]
            zout.writestr(item, data)
    with pytest.raises(NotATorchCheckpointError, match="storage '0' holds 1724 bytes"):
        read_torch_checkpoint(path)
    path.write_bytes(_rewrite_zip_pickle(src, _stretch_first_tensor))
    with pytest.raises(NotATorchCheckpointError, match="reaches element .* of storage '0'"):
        read_torch_checkpoint(path)


# ------------------------------------------------------------------------------------------------ helpers
# Variants of a teacher fixture are made by editing its data.pkl: a (trusted, test-owned) reader turns torch's
# globals and persistent ids into placeholders, and a small protocol-2 writer emits the edited tree again.


class _Global:
    """A global by name; calling it (the pickle's REDUCE) records the call instead of making it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        if (self.module, self.name) == ("collections", "OrderedDict"):
            return _ODict(*args)
        return _Reduce(self, args)


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args


class _ODict(dict):
    pass


class _PID:
    def __init__(self, pid):
        self.pid = pid


class _Reader(pickle.Unpickler):
    def find_class(self, module, name):
        return _Global(module, name)

    def persistent_load(self, pid):
        return _PID(pid)


def _emit(obj, out: bytearray):
    """Protocol-2 opcodes for the placeholder tree (no memo: shared objects are written again)."""
    if obj is None or isinstance(obj, bool):
        out += {None: b"N", True: b"\x88", False: b"\x89"}[obj]
    elif isinstance(obj, int):
        raw = obj.to_bytes((obj.bit_length() + 8) // 8 or 1, "little", signed=True)
        out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(obj, _Global):
        out += f"c{obj.module}\n{obj.name}\n".encode()
    elif isinstance(obj, _PID):
        _emit(obj.pid, out)
        out += b"Q"
    elif isinstance(obj, _Reduce):
        _emit(obj.func, out)
        _emit(tuple(obj.args), out)
        out += b"R"
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _emit(item, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for item in obj:
            _emit(item, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"ccollections\nOrderedDict\n)R" if isinstance(obj, _ODict) else b"}"
        out += b"("
        for key, value in obj.items():
            _emit(key, out)
            _emit(value, out)
        out += b"u"
    else:
        raise TypeError(f"cannot emit {type(obj).__name__}")


def _rewrite_zip_pickle(src, edit) -> bytes:
    """The zip checkpoint ``src`` with ``edit(obj)`` applied to the object of its data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(buf, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                out = bytearray(b"\x80\x02")
                _emit(edit(_Reader(io.BytesIO(data)).load()), out)
                data = bytes(out + b".")
            zout.writestr(item, data)
    return buf.getvalue()


def _prefix_model_keys(obj):
    obj["model"] = _ODict(("module." + k, v) for k, v in obj["model"].items())
    return obj


def _inject(obj, marker):
    obj["model"]["conv1.weight"] = _Reduce(_Global(os.system.__module__, "system"), (f"touch {marker}",))
    return obj


def _stretch_first_tensor(obj):
    first = next(iter(obj["model"].values()))  # conv1.weight: 432 elements, size (16, 3, 3, 3)
    first.args = first.args[:2] + ((16, 3, 3, 30),) + first.args[3:]
    return obj


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert list(fa) == list(fb)
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)

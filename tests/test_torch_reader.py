"""The torch-free ``.pth`` reader is bounded and fails cleanly: memory bounded by what a file really holds,
checked before allocating (views, zip entries, pickle streams, memo, stack and containers), one
``TorchCheckpointError`` of bounded length for every malformed file, and no way for a file to alter the
allowlisted globals.

The files are crafted here, without torch, by a small protocol-2 pickle writer and a zip writer that can also
write what zipfile refuses to (wrong sizes, flags, methods). Loads that could take memory run in a subprocess
under a 1 GiB address-space limit, so a regression fails with MemoryError there instead of exhausting the machine.
This module imports neither conftest nor JAX: tests/test_torch_reader_fuzz.py imports it into such a subprocess.
"""
import collections
import dataclasses
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zlib
from typing import Optional, Sequence

import numpy as np
import pytest

from kdjax.checkpoint import torch_pickle
from kdjax.checkpoint.torch_pickle import (CheckpointLimitError, NotATorchCheckpointError, TorchCheckpointError,
                                           TruncatedCheckpointError, UnsafePickleError)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REPO = pathlib.Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 2 ** 30
READER_ERRORS = (CheckpointLimitError, NotATorchCheckpointError, TruncatedCheckpointError, UnsafePickleError)

# ------------------------------------------------------------------------------------ a protocol-2 writer

PROTO2, STOP = b"\x80\x02", b"."


def op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])  # BININT1
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)  # BININT
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw)) + raw


def op_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def op_global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def op_tuple(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def op_call(func: bytes, *args: bytes) -> bytes:
    return func + op_tuple(*args) + b"R"


def op_ordered_dict() -> bytes:
    return op_call(op_global("collections", "OrderedDict"))


@dataclasses.dataclass
class Tensor:
    """A tensor as torch pickles it: ``_rebuild_tensor_v2`` over storage ``key`` of ``numel`` elements."""

    key: str
    numel: int
    shape: tuple
    stride: tuple
    offset: int = 0
    storage: str = "FloatStorage"
    view: Optional[tuple] = None  # legacy storage view (view_key, offset, count)
    legacy: bool = False


def op_tensor(t: Tensor) -> bytes:
    fields = [op_str("storage"), op_global("torch", t.storage), op_str(t.key), op_str("cpu"), op_int(t.numel)]
    if t.legacy:
        fields.append(b"N" if t.view is None else op_tuple(op_str(t.view[0]), op_int(t.view[1]), op_int(t.view[2])))
    pid = op_tuple(*fields) + b"Q"  # BINPERSID
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), pid, op_int(t.offset),
                   op_tuple(*map(op_int, t.shape)), op_tuple(*map(op_int, t.stride)), b"\x89", op_ordered_dict())


class Raw(bytes):
    """Opcodes written as they are."""


def op_value(obj) -> bytes:
    """Opcodes that build ``obj``: plain values, containers, ``Tensor`` and ``Raw``."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, Tensor):
        return op_tensor(obj)
    if obj is None or isinstance(obj, bool):
        return {None: b"N", True: b"\x88", False: b"\x89"}[obj]
    if isinstance(obj, int):
        return op_int(obj)
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, str):
        return op_str(obj)
    if isinstance(obj, tuple):
        return op_tuple(*map(op_value, obj))
    if isinstance(obj, list):
        return b"](" + b"".join(map(op_value, obj)) + b"e"
    if isinstance(obj, dict):
        opening = op_ordered_dict() if isinstance(obj, collections.OrderedDict) else b"}"
        return opening + b"(" + b"".join(op_value(k) + op_value(v) for k, v in obj.items()) + b"u"
    raise TypeError(f"cannot write {type(obj).__name__}")


def pickle_of(obj) -> bytes:
    return PROTO2 + op_value(obj) + STOP


# ------------------------------------------------------------------------------------------ containers


@dataclasses.dataclass
class ZipMember:
    """One zip entry; ``data`` as stored (compressed for method 8), ``plain`` what it inflates to (for the CRC),
    ``file_size`` / ``crc`` override what the entry declares."""

    name: str
    data: bytes
    method: int = 0
    flags: int = 0
    plain: Optional[bytes] = None
    file_size: Optional[int] = None
    crc: Optional[int] = None


def zip_bytes(members: Sequence[ZipMember]) -> bytes:
    """A zip archive written field by field, so that its entries may declare anything."""
    body, directory = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        plain = m.data if m.plain is None else m.plain
        crc = zlib.crc32(plain) if m.crc is None else m.crc
        size = len(plain) if m.file_size is None else m.file_size
        fields = (m.flags, m.method, 0, 0x21, crc, len(m.data), size, len(name), 0)  # 0x21: 1980-01-01
        directory += struct.pack("<IHH", 0x02014B50, 20, 20) + struct.pack("<HHHHIIIHH", *fields) \
            + struct.pack("<HHHII", 0, 0, 0, 0, len(body)) + name
        body += struct.pack("<IH", 0x04034B50, 20) + struct.pack("<HHHHIIIHH", *fields) + name + m.data
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), len(body), 0)
    return bytes(body + directory + end)


def deflate(plain: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip stores it
    return compressor.compress(plain) + compressor.flush()


def deflated_zeros(n_mib: int) -> bytes:
    """A deflate stream of ``n_mib`` MiB of zeros, about 1 KiB per MiB, made without compressing it all: after a
    full flush the compressor starts afresh, so every MiB compresses to the same bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(2 ** 20)
    first = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert first == again
    return first * n_mib + compressor.flush()


def zip_checkpoint(pkl: bytes, storages: dict, prefix: str = "archive", extra: Sequence[ZipMember] = ()) -> bytes:
    """A zip checkpoint as torch.save writes it (stored entries): data.pkl, byteorder, data/<key>."""
    members = [ZipMember(f"{prefix}/data.pkl", pkl), ZipMember(f"{prefix}/byteorder", b"little")]
    members += [ZipMember(f"{prefix}/data/{key}", raw) for key, raw in storages.items()]
    return zip_bytes(members + list(extra))


LEGACY_HEADER = (pickle.dumps(torch_pickle.LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
                 + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))


def legacy_checkpoint(pkl: bytes, storages: Sequence[tuple] = ()) -> bytes:
    """A legacy checkpoint: header pickles, the object, the key list, then per (key, numel, raw) the data."""
    data = b"".join(struct.pack("<q", numel) + raw for _, numel, raw in storages)
    return LEGACY_HEADER + pkl + pickle.dumps([key for key, _, _ in storages], protocol=2) + data


def floats(*values) -> bytes:
    return np.asarray(values, np.float32).tobytes()


# ------------------------------------------------------------------------------------ running the reader

_LIMITED_LOAD = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from kdjax.checkpoint.torch_import import read_torch_checkpoint
outcomes = {}
for path in sys.argv[2:]:
    try:
        read_torch_checkpoint(path)
        outcomes[path] = ["ok", ""]
    except BaseException as e:
        outcomes[path] = [type(e).__name__, str(e)[:100000]]
print(json.dumps(outcomes))
"""


def limited_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                JAX_PLATFORMS="cpu")


def load_limited(paths, limit: int = MEMORY_LIMIT, timeout: float = 300) -> dict:
    """{path: (error class name or 'ok', message)} of ``read_torch_checkpoint`` in a process limited to ``limit``
    bytes of address space."""
    paths = [str(p) for p in paths]
    proc = subprocess.run([sys.executable, "-c", _LIMITED_LOAD, str(limit), *paths], capture_output=True, text=True,
                          timeout=timeout, env=limited_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p: tuple(v) for p, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def load_one_limited(path, **kwargs) -> tuple:
    return load_limited([path], **kwargs)[str(path)]


def check_message(error: BaseException, path) -> str:
    """The message: one line, the path, then at most MAX_MESSAGE_CHARS characters."""
    msg = str(error)
    assert "\n" not in msg, msg[:500]
    assert msg.startswith(f"{path}: "), msg[:500]
    assert len(msg) <= len(str(path)) + 2 + torch_pickle.MAX_MESSAGE_CHARS, msg[:500]
    return msg


def write(tmp_path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------- 1a: tensor views


def test_strides_that_repeat_elements_are_refused_before_allocating(tmp_path):
    """434 bytes viewing a 4-float storage as 50000 x 50000 with strides 0 (9.3 GiB as float32)."""
    pkl = pickle_of({"w": Tensor("0", 4, (50000, 50000), (0, 0))})
    path = write(tmp_path, "expand.pth", zip_checkpoint(pkl, {"0": floats(1, 2, 3, 4)}))
    assert path.stat().st_size < 1000
    kind, msg = load_one_limited(path)
    assert kind == "NotATorchCheckpointError" and "more than once" in msg, (kind, msg[:300])


@pytest.mark.parametrize("shape, stride", [((3, 3), (1, 1)), ((2, 2), (1, 0)), ((4,), (0,)), ((2, 3), (2, 1)),
                                           ((3, 2, 2), (2, 1, 1))])
def test_overlapping_views_are_refused(tmp_path, shape, stride):
    pkl = pickle_of({"w": Tensor("0", 12, shape, stride)})
    path = write(tmp_path, "overlap.pth", zip_checkpoint(pkl, {"0": floats(*range(12))}))
    with pytest.raises(NotATorchCheckpointError, match="more than once") as err:
        torch_pickle.load(path)
    check_message(err.value, path)


@pytest.mark.parametrize("offset, shape, stride", [
    (0, (3, 4), (4, 1)),  # contiguous
    (0, (4, 3), (1, 4)),  # transposed
    (1, (2, 2), (6, 2)),  # stepped slice with an offset
    (2, (2, 1, 3), (4, 10 ** 15, 1)),  # a size-1 dimension: its stride is never applied
    (0, (2, 3, 2), (1, 4, 2)),  # permuted
    (11, (), ()),  # a scalar at the end
    (0, (0, 2 ** 40), (1, 1)),  # empty
])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_valid_views_are_read_exactly(tmp_path, offset, shape, stride, fmt):
    base = np.arange(12, dtype=np.float32)
    spec = Tensor("0", 12, shape, stride, offset, legacy=fmt == "legacy")
    pkl = pickle_of({"w": spec})
    data = zip_checkpoint(pkl, {"0": base.tobytes()}) if fmt == "zip" else \
        legacy_checkpoint(pkl, [("0", 12, base.tobytes())])
    got = torch_pickle.load(write(tmp_path, "view.pth", data))["w"]
    if math.prod(shape):
        strides = [s * 4 for s in stride]
        want = np.lib.stride_tricks.as_strided(base[offset:], shape=shape, strides=strides)
    else:
        want = np.zeros(shape, np.float32)
    assert got.shape == shape and got.flags["C_CONTIGUOUS"] and got.flags["OWNDATA"]
    np.testing.assert_array_equal(got, want)


def test_views_of_one_storage_cannot_multiply_memory(tmp_path):
    """2048 tensors, each the whole of one 1 MiB storage: 2 GiB of copies from a 1.3 MiB file."""
    numel = 2 ** 18
    tensors = Raw(b"](" + b"".join(op_tensor(Tensor("0", numel, (numel,), (1,))) for _ in range(2048)) + b"e")
    path = write(tmp_path, "views.pth", zip_checkpoint(pickle_of({"w": tensors}), {"0": bytes(4 * numel)}))
    kind, msg = load_one_limited(path)
    assert kind == "CheckpointLimitError" and "MAX_TENSOR_COPIES" in msg, (kind, msg[:300])
    # up to MAX_TENSOR_COPIES views of a storage are fine (a transposed copy, tied weights)
    copies = torch_pickle.MAX_TENSOR_COPIES
    tensors = [Tensor("0", 6, (2, 3), (3, 1)), Tensor("0", 6, (3, 2), (1, 3))] * (copies // 2)
    got = torch_pickle.load(write(tmp_path, "tied.pth", zip_checkpoint(pickle_of({"w": tensors}),
                                                                       {"0": floats(*range(6))})))["w"]
    np.testing.assert_array_equal(got[1], got[0].T)


def test_shared_containers_are_converted_once(tmp_path):
    """60 lists, each holding the next one twice (through the memo): 2**60 paths, 61 objects."""
    ops = bytearray(PROTO2 + b"N" + b"q\x00")  # the innermost value, memo 0
    for level in range(1, 61):
        ops += b"](" + b"h" + bytes([level - 1]) + b"h" + bytes([level - 1]) + b"e" + b"q" + bytes([level])
    path = write(tmp_path, "dag.pth", legacy_checkpoint(bytes(ops + STOP)))
    assert load_one_limited(path, timeout=60)[0] == "NotATorchCheckpointError"  # a list, not a state_dict
    obj = torch_pickle.load(path)
    for _ in range(60):
        assert obj[0] is obj[1]
        obj = obj[0]
    assert obj is None


# ------------------------------------------------------------------------------------ 1b: zip entries


def test_zip_entry_larger_than_announced_is_refused_before_inflating(tmp_path):
    """2 MiB on disk, 2 GiB inflated, for a storage the pickle announces as 4 floats."""
    bomb = ZipMember("archive/data/0", deflated_zeros(2048), method=8, file_size=2 ** 31, crc=0)
    pkl = pickle_of({"w": Tensor("0", 4, (4,), (1,))})
    members = [ZipMember("archive/data.pkl", pkl), ZipMember("archive/byteorder", b"little"), bomb]
    path = write(tmp_path, "bomb.pth", zip_bytes(members))
    assert path.stat().st_size < 3 * 2 ** 20
    kind, msg = load_one_limited(path)
    assert kind == "NotATorchCheckpointError" and "holds 2147483648 bytes, the pickle announces 4 x float32" in msg, \
        (kind, msg[:300])


def test_zip_entry_inflating_past_its_declared_size_is_read_no_further(tmp_path, monkeypatch):
    """The entry says 16 bytes, its deflate stream holds 64 MiB: no more than 17 bytes are inflated."""
    liar = ZipMember("archive/data/0", deflated_zeros(64), method=8, file_size=16, crc=zlib.crc32(bytes(16)))
    members = [ZipMember("archive/data.pkl", pickle_of({"w": Tensor("0", 4, (4,), (1,))})), liar]
    path = write(tmp_path, "liar.pth", zip_bytes(members))
    inflated = []
    real_read_at_most = torch_pickle._read_at_most

    def counting(member, limit):
        data = real_read_at_most(member, limit)
        inflated.append(len(data))
        return data

    monkeypatch.setattr(torch_pickle, "_read_at_most", counting)
    try:
        obj = torch_pickle.load(path)
    except NotATorchCheckpointError as e:
        check_message(e, path)
    else:  # zipfile stops at the declared size; then the CRC of those 16 bytes holds
        np.testing.assert_array_equal(obj["w"], np.zeros(4, np.float32))
    assert inflated[-1] <= 17  # the storage's read (the first is data.pkl's)


def test_data_pkl_over_the_limit_is_refused_before_inflating(tmp_path):
    big = ZipMember("archive/data.pkl", deflated_zeros(65), method=8, file_size=torch_pickle.MAX_PICKLE_BYTES + 1,
                    crc=0)
    path = write(tmp_path, "big_pickle.pth", zip_bytes([big]))
    kind, msg = load_one_limited(path)
    assert kind == "CheckpointLimitError" and "MAX_PICKLE_BYTES" in msg, (kind, msg[:300])


def test_legacy_pickles_over_the_limit_are_refused(tmp_path, monkeypatch):
    """The legacy pickles are read straight from the file: a budget stops them, not the file's end."""
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", 4096)
    path = write(tmp_path, "long.pth", legacy_checkpoint(pickle_of({"note": "x" * 5000})))
    with pytest.raises(CheckpointLimitError, match="MAX_PICKLE_BYTES") as err:
        torch_pickle.load(path)
    check_message(err.value, path)
    # a declared length beyond the file is the file ending early, not a reason to allocate
    path = write(tmp_path, "cut.pth", LEGACY_HEADER + PROTO2 + b"\x8e" + struct.pack("<Q", 2 ** 60) + b"abc")
    with pytest.raises(TruncatedCheckpointError, match="truncated"):
        torch_pickle.load(path)


# ------------------------------------------------------------------------------------ 1c: the unpickler


LIMIT_CASES = {  # name: (the limit to lower, to what, pickle body that exceeds it)
    "memo": ("MAX_MEMO_ENTRIES", 1000, b"N" + b"\x94" * 1001),
    "containers": ("MAX_CONTAINERS", 1000, b"]" + b"\x8fa" * 1001),
    "items": ("MAX_CONTAINER_ITEMS", 1000, b"]" + b"Na" * 1001),
    "stack": ("MAX_STACK_ITEMS", 1000, b"N" * 1001),
    "set_aside_by_mark": ("MAX_STACK_ITEMS", 1000, (b"N" * 20 + b"(") * 60),
    "opcodes": ("MAX_PICKLE_OPCODES", 1000, b"(1" * 501 + b"N"),
    "marks": ("MAX_NESTING_DEPTH", 100, b"(" * 101),
    # one memoized list of 100 pairs handed to OrderedDict 100 times: each call copies it
    "call_copies": ("MAX_CONTAINER_ITEMS", 5000, b"](" + b"".join(op_tuple(op_int(i), b"N") for i in range(100))
                    + b"eq\x00" + (op_global("collections", "OrderedDict") + b"h\x00\x85R0") * 100),
}


@pytest.mark.parametrize("case", sorted(LIMIT_CASES))
def test_pickle_limits(tmp_path, monkeypatch, case):
    name, value, body = LIMIT_CASES[case]
    default = getattr(torch_pickle, name)
    monkeypatch.setattr(torch_pickle, name, value)
    path = write(tmp_path, f"{case}.pth", legacy_checkpoint(PROTO2 + body + b"N" + STOP))
    with pytest.raises(CheckpointLimitError, match=f"{value}") as err:
        torch_pickle.load(path)
    check_message(err.value, path)
    monkeypatch.undo()
    if value < default:  # the same pickle within the real limits
        assert torch_pickle.load(path) is None


def test_memo_flood_is_refused_at_the_real_limit(tmp_path):
    """A MEMOIZE opcode is one byte; a dict slot for it is dozens."""
    body = b"N" + b"\x94" * (torch_pickle.MAX_MEMO_ENTRIES + 1)
    path = write(tmp_path, "memo.pth", legacy_checkpoint(PROTO2 + body + STOP))
    kind, msg = load_one_limited(path)
    assert kind == "CheckpointLimitError" and "memo entries" in msg, (kind, msg[:300])


def test_dict_keys_that_collide_are_refused(tmp_path):
    """Ints equal modulo 2**61 - 1 hash alike: n of them take n**2 comparisons to put in a dict."""
    modulus = 2 ** 61 - 1
    body = b"}(" + b"".join(op_int(k * modulus) + b"N" for k in range(1, 3000)) + b"u"
    path = write(tmp_path, "collide.pth", legacy_checkpoint(PROTO2 + body + STOP))
    with pytest.raises(NotATorchCheckpointError, match="dict key") as err:
        torch_pickle.load(path)
    check_message(err.value, path)
    for pairs in ([(k * modulus, None) for k in range(1, 3)], [((1, 2), None)]):  # OrderedDict(pairs), tuple keys
        body = op_call(op_global("collections", "OrderedDict"), op_value([Raw(op_value(p)) for p in pairs]))
        path = write(tmp_path, "collide.pth", legacy_checkpoint(PROTO2 + body + STOP))
        with pytest.raises(NotATorchCheckpointError, match="dict key"):
            torch_pickle.load(path)


# ---------------------------------------------------------------------------- 2: one error per malformed file


def _chain_of_views(length: int) -> bytes:
    """Legacy persistent ids whose storage views each view the previous one."""
    refs = [Raw(op_tensor(Tensor(f"k{i}", 4, (1,), (1,), legacy=True, view=(f"k{i + 1}", 0, 4))))
            for i in range(length)]
    return legacy_checkpoint(pickle_of({"chain": refs, "model": {"w": refs[-1]}}), [("k0", 4, floats(1, 2, 3, 4))])


def _deep_lists(depth: int) -> bytes:
    return legacy_checkpoint(PROTO2 + b"]" * depth + b"a" * (depth - 1) + STOP)


def _zip_with_storage_member(**member) -> bytes:
    pkl = pickle_of({"w": Tensor("0", 4, (4,), (1,))})
    return zip_bytes([ZipMember("archive/data.pkl", pkl), ZipMember("archive/data/0", **member)])


_BAD_DEFLATE = b"\xff" * 40
_HUGE = "x" * 10 ** 7

def _huge_dtype_spec() -> bytes:
    return legacy_checkpoint(PROTO2 + op_call(op_global("numpy", "dtype"), op_str("f8," * 300000)) + STOP)


MALFORMED = {  # name: (what writes the file, the reader error expected); built when the test runs
    "self_referential_list": (lambda: legacy_checkpoint(PROTO2 + b"]q\x00h\x00a" + STOP), NotATorchCheckpointError),
    "self_referential_dict": (lambda: legacy_checkpoint(PROTO2 + b"}q\x00X\x01\x00\x00\x00ah\x00s" + STOP),
                              NotATorchCheckpointError),
    "deeply_nested_lists": (lambda: _deep_lists(5000), CheckpointLimitError),
    "long_chain_of_storage_views": (lambda: _chain_of_views(3000), NotATorchCheckpointError),
    "corrupt_deflate": (lambda: _zip_with_storage_member(data=_BAD_DEFLATE, method=8, plain=bytes(16)),
                        NotATorchCheckpointError),
    "bad_crc": (lambda: _zip_with_storage_member(data=floats(1, 2, 3, 4), crc=1), NotATorchCheckpointError),
    "encrypted_entry": (lambda: _zip_with_storage_member(data=floats(1, 2, 3, 4), flags=1), NotATorchCheckpointError),
    "unknown_compression": (lambda: _zip_with_storage_member(data=floats(1, 2, 3, 4), method=99),
                            NotATorchCheckpointError),
    "lzma_entry": (lambda: _zip_with_storage_member(data=_BAD_DEFLATE, method=14, plain=bytes(16)),
                   NotATorchCheckpointError),
    "cut_zip": (lambda: _zip_with_storage_member(data=floats(1, 2, 3, 4))[:-120], TruncatedCheckpointError),
    "invalid_utf8": (lambda: legacy_checkpoint(PROTO2 + b"X\x02\x00\x00\x00\xff\xfe" + STOP),
                     NotATorchCheckpointError),
    "cut_inside_an_int": (lambda: zip_checkpoint(PROTO2 + b"J\x01\x02", {}), NotATorchCheckpointError),
    "huge_bytes_length": (lambda: LEGACY_HEADER + PROTO2 + b"\x8e" + struct.pack("<Q", 2 ** 62) + b"x" * 10,
                          TruncatedCheckpointError),
    "huge_frame": (lambda: LEGACY_HEADER + b"\x80\x04\x95" + struct.pack("<Q", 2 ** 62) + b"N.",
                   TruncatedCheckpointError),
    "huge_bytearray8": (lambda: LEGACY_HEADER + PROTO2 + b"\x96" + struct.pack("<Q", 2 ** 62) + STOP,
                        UnsafePickleError),
    "huge_memo_index": (lambda: legacy_checkpoint(PROTO2 + b"Np99999999999999999999999\n" + STOP),
                        NotATorchCheckpointError),
    "huge_long_binput": (lambda: legacy_checkpoint(PROTO2 + b"Nr\xff\xff\xff\xff" + STOP), NotATorchCheckpointError),
    "empty_data_pkl": (lambda: zip_checkpoint(b"", {}), NotATorchCheckpointError),
    "garbage_central_directory": (lambda: b"PK\x03\x04" + b"\x00" * 100 + b"PK\x05\x06" + b"\xff" * 18,
                                  TruncatedCheckpointError),
    "ten_mb_global_name": (lambda: legacy_checkpoint(PROTO2 + op_global("os", _HUGE) + STOP), UnsafePickleError),
    "ten_mb_storage_key": (lambda: zip_checkpoint(pickle_of({"w": Tensor(_HUGE, 4, (4,), (1,))}), {}),
                           NotATorchCheckpointError),
    "ten_mb_byteorder": (lambda: zip_bytes([ZipMember("a/data.pkl", pickle_of({})),
                                            ZipMember("a/byteorder", b"x" * 10 ** 7)]), NotATorchCheckpointError),
    "ten_mb_dict_key": (lambda: legacy_checkpoint(pickle_of({_HUGE: 1, "b": 2})), NotATorchCheckpointError),
    "ten_mb_non_tensor_entry": (lambda: legacy_checkpoint(pickle_of({"model": {_HUGE: 1}})),
                                NotATorchCheckpointError),
    "huge_shape_int": (lambda: zip_checkpoint(pickle_of({"w": Tensor("0", 4, (2 ** 80000,), (1,))}),
                                              {"0": floats(1, 2, 3, 4)}), NotATorchCheckpointError),
    "build_on_a_dict": (lambda: legacy_checkpoint(PROTO2 + b"}}b" + STOP), UnsafePickleError),
    "newobj": (lambda: legacy_checkpoint(PROTO2 + op_global("collections", "OrderedDict") + b")\x81" + STOP),
               UnsafePickleError),
    "call_of_a_non_function": (lambda: legacy_checkpoint(PROTO2 + op_global("torch", "FloatStorage") + b")R" + STOP),
                               UnsafePickleError),
    "storage_view_outside_its_storage": (lambda: legacy_checkpoint(pickle_of({"model": {"w": Tensor(
        "0", 4, (1,), (1,), legacy=True, view=("v", 3, 5))}}), [("0", 4, floats(1, 2, 3, 4))]),
        NotATorchCheckpointError),
    "dtype_spec_of_a_megabyte": (_huge_dtype_spec, UnsafePickleError),
}


@pytest.fixture(scope="module")
def malformed_outcomes(tmp_path_factory):
    """Every MALFORMED file read once, in one memory-limited process."""
    folder = tmp_path_factory.mktemp("malformed")
    paths = {name: write(folder, f"{name}.pth", make()) for name, (make, _) in MALFORMED.items()}
    outcomes = load_limited(paths.values(), timeout=120)
    return {name: (paths[name], outcomes[str(paths[name])]) for name in MALFORMED}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_one_reader_error(malformed_outcomes, case):
    path, (kind, msg) = malformed_outcomes[case]
    assert kind == MALFORMED[case][1].__name__, (kind, msg[:300])
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert len(msg) <= len(str(path)) + 2 + torch_pickle.MAX_MESSAGE_CHARS, msg[:400]


def test_brief_bounds_any_value():
    nested = []
    for _ in range(10 ** 5):
        nested = [nested]
    selfish = []
    selfish.append(selfish)
    values = [_HUGE, _HUGE.encode(), 10 ** 50000, nested, selfish, {_HUGE: _HUGE}, (_HUGE,) * 10 ** 6,
              collections.OrderedDict(a=1), np.zeros((3, 4)), object(), torch_pickle._Storage("0", np.float32, 1)]
    for value in values:
        for limit in (20, 60, 300):
            assert len(torch_pickle.brief(value, limit)) <= limit
    assert torch_pickle.brief("fc.weight") == "'fc.weight'" and torch_pickle.brief((1, 2)) == "(1, 2)"


# --------------------------------------------------------------------------- 3: allowlisted globals stay put


def _allowlisted_snapshot():
    snapshot = {}
    for key, target in torch_pickle._allowed_globals().items():
        if getattr(torch_pickle, getattr(target, "__name__", ""), None) is not target:
            continue  # made afresh for every load: nothing of it outlives one
        snapshot[key] = (target, {a: getattr(target, a, None) for a in ("__name__", "__defaults__", "__doc__",
                                                                         "__kwdefaults__")},
                         dict(getattr(target, "__dict__", {}) or {}))
    return snapshot


@pytest.mark.parametrize("target", [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                                    ("collections", "OrderedDict"), ("numpy", "dtype"), ("torch", "Size"),
                                    ("_codecs", "encode"), ("torch", "FloatStorage"), ("torch", "Tensor")])
@pytest.mark.parametrize("state", ["slots", "dict"])
def test_build_cannot_alter_allowlisted_globals(tmp_path, target, state):
    evil = {"__name__": "evil", "__defaults__": (1, 2, 3, 4, 5, 6, 7), "__doc__": "evil", "marker": 1}
    state_ops = op_value((None, evil)) if state == "slots" else op_value(evil)
    path = write(tmp_path, "build.pth", legacy_checkpoint(PROTO2 + op_global(*target) + state_ops + b"b" + STOP))
    before = _allowlisted_snapshot()
    try:
        with pytest.raises(UnsafePickleError, match=f"alter {target[0]}.{target[1]}") as err:
            torch_pickle.load(path)
        check_message(err.value, path)
        assert _allowlisted_snapshot() == before
    finally:  # whatever happened, later tests see the real functions
        for obj, attributes, namespace in before.values():
            for name, value in attributes.items():
                if value is not None and getattr(obj, name, None) != value:
                    setattr(obj, name, value)
            if hasattr(obj, "__dict__") and isinstance(obj.__dict__, dict):
                for name in set(obj.__dict__) - set(namespace):
                    delattr(obj, name)


def test_state_of_the_readers_placeholders_is_still_taken(tmp_path):
    """What torch writes through BUILD: an OrderedDict's _metadata (dropped), a numpy dtype's byte order."""
    metadata = op_value({"_metadata": {"": {"version": 1}}})
    sd = op_ordered_dict() + b"(" + op_str("a") + op_int(1) + b"u" + metadata + b"b"
    scalar = op_call(op_global("numpy.core.multiarray", "scalar"),
                     op_call(op_global("numpy", "dtype"), op_str("f8"), b"\x89", b"\x88")
                     + op_value((3, ">", None, None, None, -1, -1, 0)) + b"b",
                     op_call(op_global("_codecs", "encode"), op_str("@\x08\x00\x00\x00\x00\x00\x00"), op_str("latin1")))
    path = write(tmp_path, "state.pth", legacy_checkpoint(PROTO2 + op_tuple(sd, scalar) + STOP))
    sd_obj, value = torch_pickle.load(path)
    assert sd_obj == collections.OrderedDict(a=1) and not hasattr(sd_obj, "_metadata")
    assert type(value) is np.float64 and value == 3.0


# ------------------------------------------------------------------------------ 4: no JAX for the reader


def test_reader_imports_without_jax():
    """Under 1 GiB of address space (where JAX cannot start) the reader imports and reads a teacher."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
            "import kdjax, kdjax.checkpoint.torch_pickle, kdjax.checkpoint.torch_names\n"
            "from kdjax.checkpoint import read_torch_checkpoint, CheckpointMismatch, TorchCheckpointError\n"
            f"sd, info = read_torch_checkpoint({str(FIXTURES / 'resnet8_c100_s32_legacy.pth')!r})\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'orbax', 'flax', 'tensorflow')]\n"
            "print(len(sd), info['epoch'], heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=limited_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["56", "240", "[]"], proc.stdout


def test_checkpoint_package_exports_on_first_use():
    import kdjax.checkpoint as package
    from kdjax.checkpoint import CheckpointMismatch, load_model, read_torch_checkpoint
    from kdjax.checkpoint import store, torch_names, torch_pickle as reader  # submodules still import

    assert load_model is store.load_model and CheckpointMismatch is torch_names.CheckpointMismatch
    assert package.torch_import.read_torch_checkpoint is read_torch_checkpoint
    assert reader.TorchCheckpointError is TorchCheckpointError
    for name in package.__all__:
        assert getattr(package, name) is not None and name in dir(package)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        package.nothing  # noqa: B018


# --------------------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize("container", ["dict SETITEMS", "dict SETITEM", "OrderedDict SETITEMS", "OrderedDict(pairs)"])
def test_a_key_set_twice_is_refused(tmp_path, container):
    """Two weights under one name: torch never writes it, and the later one would silently replace the earlier."""
    first = op_str("fc.weight") + op_tensor(Tensor("0", 2, (2,), (1,)))
    second = op_str("fc.weight") + op_tensor(Tensor("1", 2, (2,), (1,)))
    if container == "dict SETITEMS":
        body = b"}(" + first + second + b"u"
    elif container == "dict SETITEM":
        body = b"}" + first + b"s" + second + b"s"
    elif container == "OrderedDict SETITEMS":
        body = op_ordered_dict() + b"(" + first + second + b"u"
    else:  # Python 2's OrderedDict([(k, v), (k, v)])
        body = op_call(op_global("collections", "OrderedDict"), b"](" + op_tuple(first) + op_tuple(second) + b"e")
    path = write(tmp_path, "dup.pth", zip_checkpoint(pickle_of(Raw(body)), {"0": floats(1, 2), "1": floats(3, 4)}))
    with pytest.raises(NotATorchCheckpointError, match="sets the key 'fc.weight' twice") as err:
        torch_pickle.load(path)
    check_message(err.value, path)
    unique = op_str("fc.bias") + op_tensor(Tensor("1", 2, (2,), (1,)))
    path = write(tmp_path, "ok.pth", zip_checkpoint(pickle_of(Raw(b"}(" + first + unique + b"u")),
                                                   {"0": floats(1, 2), "1": floats(3, 4)}))
    assert sorted(torch_pickle.load(path)) == ["fc.bias", "fc.weight"]

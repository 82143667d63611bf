"""Fuzzing the torch-free ``.pth`` reader with hypothesis: every input is either read -- plain containers, scalars
and owned arrays whose values are the views the file describes -- or refused with one of the reader's errors and
a bounded one-line message; and all of it within 1 GiB of address space.

The inputs are structured: pickles assembled from random opcodes and allowlisted (and foreign) globals;
checkpoints of tensors with random dtypes, shapes, strides, offsets and storage sizes in both serialisations;
zips with odd entries (encrypted flag, unknown or deflate compression, sizes and CRCs that lie, missing or doubled
entries, cut archives); and the real fixtures with their pickles mutated. One subprocess runs everything under
``RLIMIT_AS`` = 1 GiB, where a MemoryError is a failure like any other exception; the examples are derandomized,
so every run tries the same inputs.
"""
import collections
import dataclasses
import io
import math
import os
import pathlib
import struct
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_torch_reader as craft
from kdjax.checkpoint import torch_pickle
from kdjax.checkpoint.torch_import import read_torch_checkpoint
from kdjax.checkpoint.torch_pickle import TorchCheckpointError

FUZZ_EXAMPLES = 750  # per strategy: about a minute for the five here (2 shared cores)
SLOW_FUZZ_EXAMPLES = 10000  # about 15 minutes
ALLOWED = sorted(torch_pickle._allowed_globals())
FOREIGN = [("builtins", "eval"), ("os", "system"), ("torch", "load"), ("numpy", "ndarray"), ("collections", "deque")]
STORAGE_TYPES = sorted(torch_pickle._STORAGE_DTYPES)
DTYPES = {name: torch_pickle._numpy_dtype(dtype) for name, dtype in torch_pickle._STORAGE_DTYPES.items()}


# ------------------------------------------------------------------------------------------ the oracle


def assert_plain(obj) -> None:
    """Only plain containers, scalars and owned C-contiguous arrays: nothing of the reader's or the file's own."""
    seen, todo = set(), [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            assert item.flags["C_CONTIGUOUS"] and item.flags["OWNDATA"]
        elif type(item) in (dict, collections.OrderedDict):
            assert all(type(k) in (str, bytes, int, float, bool, type(None)) for k in item)
            todo.extend(item.values())
        elif type(item) in (list, tuple):
            todo.extend(item)
        elif type(item) not in (set, frozenset):
            assert isinstance(item, (str, bytes, bytearray, int, float, type(None), np.generic)), type(item)


def read_checked(data: bytes, workdir: pathlib.Path):
    """What the reader makes of ``data``: the object, or the reader error (any other exception propagates)."""
    path = workdir / "case.pth"
    path.write_bytes(data)
    try:
        obj = torch_pickle.load(path)
    except TorchCheckpointError as e:
        assert isinstance(e, craft.READER_ERRORS), type(e)
        craft.check_message(e, path)
        return e
    assert_plain(obj)
    try:  # the import layer on top must fail as cleanly
        read_torch_checkpoint(path)
    except TorchCheckpointError as e:
        craft.check_message(e, path)
    return obj


# ------------------------------------------------------------------------------------------ opcode soup

_SIMPLE_OPS = [b"N", b"\x88", b"\x89", b"]", b"}", b")", b"\x8f", b"(", b"a", b"e", b"s", b"u", b"t", b"\x85",
               b"\x86", b"\x87", b"l", b"d", b"\x91", b"\x90", b"R", b"b", b"Q", b"2", b"0", b"1", b"\x94", b"."]
_ODD_OPS = [b"\x81", b"\x92", b"\x82\x01", b"\x83\x01\x00", b"o", b"ibuiltins\neval\n", b"\x97", b"\x98",
            b"\x96" + struct.pack("<Q", 2 ** 40), b"\x95" + struct.pack("<Q", 3), b"\x8e" + struct.pack("<Q", 2 ** 50),
            b"P1\n", b"S'a'\n", b"F1.5\n", b"I01\n", b"L12\n", b"Vabc\n", b"p3\n", b"g3\n", b"p-1\n", b"\x80\x05",
            b"j\xff\xff\xff\x7f", b"r\xff\xff\xff\xff", b"\x8c\x05torch\x8c\x04Size\x93", b"\x8b\xff\xff\xff\x7f"]


def _stack_global(name) -> bytes:
    module, attribute = name
    return b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(attribute)]) \
        + attribute.encode() + b"\x93"


def wild_ints():
    return st.one_of(st.integers(0, 8), st.sampled_from([-1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 + 3]))


@st.composite
def wild_tensors(draw, legacy: bool = False) -> craft.Tensor:
    """A tensor reference with anything in its fields (small, mostly)."""
    ndim = draw(st.integers(0, 3))
    view = None
    if legacy and draw(st.booleans()):
        view = (draw(st.sampled_from(["v0", "v1", "0"])), draw(wild_ints()), draw(wild_ints()))
    return craft.Tensor(key=draw(st.sampled_from(["0", "1", "2"])), numel=draw(wild_ints()),
                        shape=tuple(draw(st.lists(wild_ints(), min_size=ndim, max_size=ndim))),
                        stride=tuple(draw(st.lists(wild_ints(), min_size=ndim, max_size=ndim))),
                        offset=draw(wild_ints()), storage=draw(st.sampled_from(STORAGE_TYPES)), legacy=legacy,
                        view=view)


def instructions(legacy: bool):
    return st.one_of(
        st.sampled_from(_SIMPLE_OPS),
        st.sampled_from(_ODD_OPS),
        st.integers(-2 ** 70, 2 ** 70).map(craft.op_int),
        st.text(max_size=6).map(craft.op_str),
        st.binary(max_size=6).map(lambda b: b"C" + bytes([len(b)]) + b),
        st.floats().map(lambda f: b"G" + struct.pack(">d", f)),
        st.sampled_from(ALLOWED + FOREIGN).map(lambda g: craft.op_global(*g)),
        st.sampled_from(ALLOWED + FOREIGN).map(_stack_global),
        st.integers(0, 6).map(lambda i: b"q" + bytes([i])),
        st.integers(0, 6).map(lambda i: b"h" + bytes([i])),
        st.binary(min_size=1, max_size=4),
        wild_tensors(legacy).map(craft.op_tensor),
    )


@st.composite
def opcode_programs(draw) -> bytes:
    """A pickle of random opcodes, as a legacy file, a zip's data.pkl or a bare pickle."""
    layout = draw(st.sampled_from(["legacy", "zip", "bare"]))
    ops = b"".join(draw(st.lists(instructions(layout == "legacy"), max_size=30)))
    program = craft.PROTO2 + ops + (craft.STOP if draw(st.booleans()) else b"")
    if layout == "zip":
        storages = {key: draw(st.binary(max_size=16)) for key in draw(st.lists(st.sampled_from("012"), max_size=3))}
        return craft.zip_checkpoint(program, storages)
    if layout == "legacy":
        keys = draw(st.lists(st.sampled_from(["0", "1", "2", "v0"]), max_size=3))
        tail = draw(st.binary(max_size=40))
        return craft.LEGACY_HEADER + program + craft.pickle_of(keys) + tail
    return program


# ------------------------------------------------------------------------- checkpoints with expected values


@dataclasses.dataclass
class Planned:
    """A checkpoint whose tensors are known, so that what the reader returns can be checked."""

    fmt: str
    tensors: Dict[str, craft.Tensor]
    storages: Dict[str, bytes]  # raw bytes of every root storage
    must_read: bool  # every view is one torch writes, inside its storage: the reader has to accept the file
    wrapped: bool  # {'model': tensors, ...} rather than the bare OrderedDict
    flaw: Optional[str] = None  # a storage whose bytes do not match the pickle: the reader has to refuse

    def pickle(self) -> bytes:
        tensors = collections.OrderedDict(self.tensors)
        obj = {"epoch": 3, "model": tensors, "accuracy": 61.25, "ExpID": "X"} if self.wrapped else tensors
        return craft.pickle_of(obj)

    def file(self) -> bytes:
        if self.fmt == "zip":  # a flawed entry holds one byte more than the pickle announces
            storages = {k: raw + (b"\x00" if k == self.flaw else b"") for k, raw in self.storages.items()}
            return craft.zip_checkpoint(self.pickle(), storages)
        used = list(dict.fromkeys(t.key for t in self.tensors.values()))  # a flawed count is one too many
        return craft.legacy_checkpoint(self.pickle(), [(k, self.numel(k) + (k == self.flaw), self.storages[k])
                                                       for k in used])

    def numel(self, key: str) -> int:
        storage_type = next(t.storage for t in self.tensors.values() if t.key == key)
        return len(self.storages[key]) // DTYPES[storage_type].itemsize

    def expected(self, name: str) -> Optional[np.ndarray]:
        """The tensor as torch reads it, or None where the view leaves its storage or repeats elements."""
        t = self.tensors[name]
        base = np.frombuffer(self.storages[t.key], DTYPES[t.storage])
        if t.view is not None:
            _, start, count = t.view
            if start + count > base.size:
                return None
            base = base[start:start + count]
        if math.prod(t.shape) == 0:
            return np.zeros(t.shape, base.dtype)
        index = np.indices(t.shape)
        offsets = np.full(t.shape, t.offset) + sum(index[d] * t.stride[d] for d in range(len(t.shape)))
        if offsets.max() >= base.size or np.unique(offsets).size != offsets.size:
            return None
        return base[offsets]


def _contiguous_strides(shape) -> List[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return strides


@st.composite
def torch_views(draw, numel: int):
    """(offset, shape, stride) of a view torch writes: a contiguous block of the storage, sliced with steps and
    its dimensions permuted; it lies inside a storage of ``numel`` elements."""
    block = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    room = numel - math.prod(block)
    if room < 0:
        return 0, (0,), (1,)
    offset = draw(st.integers(0, room))
    shape, stride = [], []
    for size, step in zip(block, _contiguous_strides(block)):
        start, every = draw(st.integers(0, size - 1)), draw(st.integers(1, 3))
        offset += start * step
        shape.append(len(range(start, size, every)))
        stride.append(every * step)
    order = draw(st.permutations(range(len(shape))))
    return offset, tuple(shape[i] for i in order), tuple(stride[i] for i in order)


@st.composite
def arbitrary_views(draw):
    ndim = draw(st.integers(0, 3))
    dims = st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)
    return draw(st.integers(0, 12)), tuple(draw(dims)), tuple(draw(st.lists(st.integers(0, 7), min_size=ndim,
                                                                             max_size=ndim)))


@st.composite
def planned_checkpoints(draw, fmt: Optional[str] = None, flawless: bool = False) -> Planned:
    fmt = fmt or draw(st.sampled_from(["zip", "legacy"]))
    keys = [str(k) for k in range(draw(st.integers(1, 3)))]
    types = {k: draw(st.sampled_from(STORAGE_TYPES)) for k in keys}
    storages = {k: draw(st.binary(min_size=n * DTYPES[types[k]].itemsize, max_size=n * DTYPES[types[k]].itemsize))
                for k, n in ((k, draw(st.integers(0, 24))) for k in keys)}
    tensors, must_read = {}, True
    for i in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys))
        numel = len(storages[key]) // DTYPES[types[key]].itemsize
        view = None
        if fmt == "legacy" and draw(st.booleans()):  # a storage view, then the tensor inside it
            start = draw(st.integers(0, numel + 2))
            view = (f"v{i}", start, draw(st.integers(0, max(numel - start, 0) + 2)))
            must_read &= start + view[2] <= numel
            numel = view[2]
        if draw(st.booleans()):
            offset, shape, stride = draw(torch_views(numel))
        else:
            (offset, shape, stride), must_read = draw(arbitrary_views()), False
        tensors[f"t{i}.weight"] = craft.Tensor(key, len(storages[key]) // DTYPES[types[key]].itemsize, shape, stride,
                                               offset, types[key], view, legacy=fmt == "legacy")
    used = sorted({t.key for t in tensors.values()})
    flaw = None if flawless else draw(st.sampled_from([None, None, None] + used))
    return Planned(fmt, tensors, storages, must_read, draw(st.booleans()), flaw)


def check_planned(plan: Planned, result) -> None:
    if plan.flaw is not None:
        assert isinstance(result, TorchCheckpointError), "a storage of the wrong size was read"
        return
    expected = {name: plan.expected(name) for name in plan.tensors}
    if any(v is None for v in expected.values()):
        assert isinstance(result, TorchCheckpointError), f"a view outside its storage was read: {plan}"
        return
    if plan.must_read:
        assert not isinstance(result, TorchCheckpointError), f"{result} for {plan}"
    if isinstance(result, TorchCheckpointError):
        return
    tensors = result["model"] if plan.wrapped else result
    assert list(tensors) == list(plan.tensors)
    for name, want in expected.items():
        got = tensors[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if got.dtype == bool:  # a copy turns a bool byte of 2 into 1: the values agree
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # bytes, so that NaN payloads count too
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


# ---------------------------------------------------------------------------------------- odd zip entries


def _members_of(archive: bytes) -> List[craft.ZipMember]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return [craft.ZipMember(info.filename, zf.read(info)) for info in zf.infolist()]


_ODDITIES = ["encrypted", "method", "deflate", "bad_deflate", "file_size", "crc", "drop", "double_pickle",
             "cut", "garbage_after"]


@st.composite
def odd_zips(draw):
    """(plan, archive, whether the oddity keeps the archive readable as the plan) of a planned zip made odd."""
    plan = draw(planned_checkpoints(fmt="zip", flawless=True))
    members = _members_of(plan.file())
    oddity = draw(st.sampled_from(_ODDITIES))
    index = draw(st.integers(0, len(members) - 1))
    m = members[index]
    if oddity == "encrypted":
        m.flags |= 1
    elif oddity == "method":
        m.method = draw(st.sampled_from([1, 6, 9, 12, 14, 93, 99]))
    elif oddity == "deflate":  # a zip tool's re-compression: still the same checkpoint
        m.data, m.plain, m.method = craft.deflate(m.data), m.data, 8
    elif oddity == "bad_deflate":
        m.data, m.plain, m.method = draw(st.binary(max_size=12)), m.data, 8
    elif oddity == "file_size":
        m.file_size = max(len(m.data) + draw(st.sampled_from([-3, -1, 1, 7, 2 ** 31])), 0)
    elif oddity == "crc":
        m.crc = draw(st.integers(0, 2 ** 32 - 1))
    elif oddity == "drop":
        members.pop(index)
    elif oddity == "double_pickle":
        members.append(craft.ZipMember("other/data.pkl", plan.pickle()))
    archive = craft.zip_bytes(members)
    if oddity == "cut":
        archive = archive[:draw(st.integers(0, len(archive) - 1))]
    elif oddity == "garbage_after":
        archive += draw(st.binary(min_size=1, max_size=30))
    return plan, archive, oddity == "deflate"


# -------------------------------------------------------------------------------------- mutated fixtures

_SMALL_FIXTURES = sorted(craft.FIXTURES.glob("torch_reader_*.pth"))


def _fixture_parts() -> Dict[str, object]:
    parts = {}
    for path in _SMALL_FIXTURES:
        data = path.read_bytes()
        parts[path.name] = _members_of(data) if data.startswith(b"PK") else data
    return parts


_FIXTURE_PARTS = _fixture_parts()


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        at = where % (len(out) + 1)
        if kind == "flip" and out:
            out[at % len(out)] ^= 1 << (value % 8)
        elif kind == "set" and out:
            out[at % len(out)] = value % 256
        elif kind == "insert":
            out[at:at] = bytes([value % 256])
        elif kind == "delete":
            del out[at:at + 1 + value % 4]
        elif kind == "cut":
            del out[at:]
    return bytes(out)


@st.composite
def mutated_fixtures(draw) -> bytes:
    """A real torch.save fixture with its pickle (zip: re-wrapped with true CRCs, legacy: in place) mutated."""
    name = draw(st.sampled_from(sorted(_FIXTURE_PARTS)))
    edits = draw(st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "cut"]),
                                    st.integers(0, 2 ** 16), st.integers(0, 255)), min_size=1, max_size=4))
    parts = _FIXTURE_PARTS[name]
    if isinstance(parts, bytes):
        return _mutate(parts, edits)
    members = [dataclasses.replace(m) for m in parts]
    target = draw(st.sampled_from([i for i, m in enumerate(members) if m.name.endswith("data.pkl")] * 3
                                  + list(range(len(members)))))
    members[target].data = _mutate(members[target].data, edits)
    return craft.zip_bytes(members)


# ------------------------------------------------------------------------------------------------ running


def run_fuzz(max_examples: int) -> None:
    """Every strategy, ``max_examples`` inputs each; an input that breaks the contract raises (with its bytes)."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="torch_reader_fuzz_"))
    config = settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))

    @config
    @given(opcode_programs())
    def soup(data):
        read_checked(data, workdir)

    @config
    @given(planned_checkpoints())
    def planned(plan):
        check_planned(plan, read_checked(plan.file(), workdir))

    @config
    @given(odd_zips())
    def odd(case):
        plan, archive, still_readable = case
        result = read_checked(archive, workdir)
        if still_readable:
            check_planned(plan, result)

    @config
    @given(mutated_fixtures())
    def mutated(data):
        read_checked(data, workdir)

    @config
    @given(st.sampled_from(_SMALL_FIXTURES + sorted(craft.FIXTURES.glob("*_c100_s32*.pth"))), st.floats(0, 1))
    def cut(path, fraction):
        data = path.read_bytes()
        cut_at = int(len(data) * fraction)
        result = read_checked(data[:cut_at], workdir)
        assert isinstance(result, TorchCheckpointError) or cut_at == len(data)

    for fuzz in (soup, planned, odd, mutated, cut):
        fuzz()


_RUN_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
sys.path.insert(0, {tests!r})
import test_torch_reader_fuzz
test_torch_reader_fuzz.run_fuzz({examples})
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'orbax', 'flax'))
print('max rss MiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, 'heavy', heavy)
"""


def run_limited_fuzz(examples: int, timeout: float) -> str:
    code = _RUN_LIMITED.format(limit=craft.MEMORY_LIMIT, tests=str(pathlib.Path(__file__).parent), examples=examples)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=craft.limited_env(), cwd=craft.REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.stdout.strip().endswith("heavy []"), proc.stdout[-2000:]
    return proc.stdout


def test_fuzz_reader_within_one_gib():
    run_limited_fuzz(FUZZ_EXAMPLES, timeout=600)


@pytest.mark.slow
def test_fuzz_reader_within_one_gib_long():
    run_limited_fuzz(SLOW_FUZZ_EXAMPLES, timeout=3 * 3600)


if __name__ == "__main__":  # python tests/test_torch_reader_fuzz.py [examples]: the fuzz in this process
    run_fuzz(int(sys.argv[1]) if len(sys.argv) > 1 else FUZZ_EXAMPLES)
    print("ok", os.getpid())

"""Read PyTorch ``.pth`` files into NumPy without torch and without running code from the file.

A ``.pth`` file is a pickle, and unpickling an untrusted pickle can call any importable function. This reader
resolves only an allowlist of globals -- the handful that a ``state_dict`` (and the teachers' checkpoint dict
around it) needs -- and answers every other global with :class:`UnsafePickleError` naming it. Tensors are
rebuilt from raw storage bytes by NumPy; their views are checked before NumPy touches memory.

Two serialisations are read:

* zip (``torch.save`` since PyTorch 1.6): an archive ``<name>/data.pkl`` whose persistent ids
  ``('storage', type, key, location, numel)`` point at ``<name>/data/<key>``; ``<name>/byteorder`` says the byte
  order (little when absent).
* legacy (before 1.6, the CRD teachers' format): five consecutive pickles -- magic number, protocol version
  (1001), system info (``little_endian``), the object (persistent ids ``('storage', type, key, location, numel,
  view_metadata)``), the list of storage keys -- then, per key in that order, an 8-byte element count and the raw
  elements.

The reader is bounded: what it allocates is bounded by what the file really holds, checked before the
allocation (the ``MAX_*`` constants below), and every malformed file ends in one :class:`TorchCheckpointError`
subclass whose message is the path and at most ``MAX_MESSAGE_CHARS`` characters.

``load(path)`` returns the unpickled object with every tensor as a NumPy array (a 0-d array for scalars).
"""
import collections
import io
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, Optional

import numpy as np
from kdjax.errors import KdjaxError

# ------------------------------------------------------------------------------------------------------ limits
# A state_dict's pickle holds names, shapes and storage keys (per tensor about 130 bytes, 35 opcodes, 9 memo
# entries, 8 containers and 20 container items); the tensor bytes live outside it. The limits leave room for tens
# of thousands of tensors and bound what a corrupt or hostile pickle can make the reader build.

MAX_PICKLE_BYTES = 64 * 2 ** 20  # all pickle bytes of a file (zip: data.pkl; legacy: its five pickles together)
MAX_PICKLE_OPCODES = 2 ** 22  # opcodes run: this bounds the time (a few microseconds each, so seconds in all)
MAX_MEMO_ENTRIES = 2 ** 19  # memo entries (each costs a dict slot for a 1-byte MEMOIZE opcode)
MAX_CONTAINERS = 2 ** 19  # containers and call results built (an empty set costs 216 bytes for 1 opcode byte)
MAX_CONTAINER_ITEMS = 2 ** 21  # items taken off the stack into containers and calls, plus what calls copy
MAX_STACK_ITEMS = 2 ** 19  # items on the unpickler's stack, those set aside by MARK included
MAX_NESTING_DEPTH = 100  # MARKs open at once, and containers inside containers in the result
MAX_TENSOR_DIMS = 32  # NumPy 1's limit; real tensors have a handful
MAX_TENSOR_COPIES = 4  # the arrays returned hold at most this many times the bytes of the storages read
MAX_MESSAGE_CHARS = 300  # an error message: the path, then at most this many characters

_READ_CHUNK = 2 ** 20  # zip members are read in pieces of this size, so no buffer outruns the data itself
_HASH_MODULUS = 2 ** 61 - 1  # CPython hashes ints modulo this: larger int keys can be made to collide


class TorchCheckpointError(KdjaxError, ValueError):
    """A file cannot be read as a PyTorch checkpoint."""


class NotATorchCheckpointError(TorchCheckpointError):
    """The file is not a PyTorch checkpoint (or its structure is corrupt)."""


class TruncatedCheckpointError(TorchCheckpointError):
    """The file ends before the checkpoint does."""


class UnsafePickleError(TorchCheckpointError):
    """The pickle asks for a global outside the allowlist (it could run code), or to alter one."""


class CheckpointLimitError(TorchCheckpointError):
    """The file asks for more than a limit of this reader (the ``MAX_*`` constants): it is corrupt or crafted,
    or far larger than a state_dict."""


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001

_FIX_TRUNCATED = "copy or download it again (compare its size with the source)"
_FIX_FORMAT = "pass a file written by torch.save (a state_dict, or a dict holding one under 'model')"
_CRAFTED = "the file is corrupt or crafted"

# what a malformed pickle raises from inside the (pure-Python) unpickler and the allowlisted calls
_UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, AttributeError,
                      IndexError, KeyError, OverflowError)
# what a malformed archive raises from inside zipfile and its decompressors
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error, RuntimeError,
               NotImplementedError, OverflowError, KeyError, IndexError)


# ---------------------------------------------------------------------------------------------- messages


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def brief(value, limit: int = 60) -> str:
    """A repr of ``value`` of at most ``limit`` characters, for error messages.

    Values from a file can be megabytes long, nested thousands deep or contain themselves, so a plain ``repr``
    could be huge or fail; this one looks at a bounded part of ``value`` only.
    """
    return _cut(_short_repr(value, depth=0, limit=limit), limit)


def _short_repr(value, depth: int, limit: int) -> str:
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):  # a huge int's repr is slow, and beyond 4300 digits an error
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (tuple, list, set, frozenset, dict)):
        return _short_container_repr(value, depth, limit)
    if isinstance(value, np.ndarray):
        return f"<array {value.shape} {value.dtype}>"
    if isinstance(value, _StorageType):
        return f"torch.{value.name}"
    return f"<{type(value).__name__}>"


def _short_container_repr(value, depth: int, limit: int) -> str:
    opening, closing = {tuple: ("(", ")"), list: ("[", "]")}.get(type(value), ("{", "}"))
    if isinstance(value, collections.OrderedDict):
        opening, closing = "OrderedDict({", "})"
    if depth >= 2 or not value:
        return opening + ("..." if value else "") + closing
    shown = []
    for count, item in enumerate(value.items() if isinstance(value, dict) else value):
        if count == 8 or sum(map(len, shown)) > limit:
            shown.append("...")
            break
        if isinstance(value, dict):
            shown.append(f"{_short_repr(item[0], depth + 1, 24)}: {_short_repr(item[1], depth + 1, 24)}")
        else:
            shown.append(_short_repr(item, depth + 1, 24))
    single = "," if type(value) is tuple and len(value) == 1 else ""
    return opening + ", ".join(shown) + single + closing


def _brief_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {_cut(str(error).replace(chr(10), ' '), 100)}"


def checkpoint_error(cls, path: str, detail: str) -> TorchCheckpointError:
    """``cls`` with the message ``'<path>: <detail>'``, ``detail`` cut to ``MAX_MESSAGE_CHARS``."""
    return cls(f"{path}: {_cut(detail, MAX_MESSAGE_CHARS)}")


# ------------------------------------------------------------------------------ the allowlisted objects


_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # installed with jax; NumPy itself has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _Inert:
    """Base of the reader's own placeholder objects, which never reach the caller."""

    __slots__ = ()


class _StorageType(_Inert):
    """What ``torch.FloatStorage`` and friends resolve to: only the element type matters."""

    __slots__ = ("name", "dtype_name")

    def __init__(self, name: str, dtype_name: str):
        self.name, self.dtype_name = name, dtype_name


class _Storage(_Inert):
    """A flat run of elements whose bytes arrive after unpickling (legacy) or on demand (zip)."""

    __slots__ = ("key", "dtype", "numel", "data", "base", "base_offset")

    def __init__(self, key: str, dtype: np.dtype, numel: int, base: "Optional[_Storage]" = None,
                 base_offset: int = 0):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: Optional[np.ndarray] = None
        self.base, self.base_offset = base, base_offset  # legacy storage views (always of a root storage)

    def array(self) -> np.ndarray:
        if self.base is not None:
            return self.base.array()[self.base_offset:self.base_offset + self.numel]
        if self.data is None:
            raise NotATorchCheckpointError(f"storage {brief(self.key)} is referenced but its data is absent")
        return self.data


class _TensorRef(_Inert):
    """A tensor as the pickle describes it; turned into an array once the storages are filled."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _TensorClass(_Inert):
    """``torch.Tensor`` / ``torch.nn.Parameter`` as the ``new_type`` of ``_rebuild_from_type_v2``."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


_NUMERIC_DTYPE_SPEC = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")


class _NumpyDType(_Inert):
    """``numpy.dtype(spec, align, copy)`` kept as a spec: a real dtype's ``__setstate__`` accepts flags that are
    not safe to take from a file. Only the byte order of its state is read."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec, align=False, copy=True):
        # checked before numpy parses it: a spec string of megabytes would build a huge structured dtype
        if not (isinstance(spec, str) and _NUMERIC_DTYPE_SPEC.fullmatch(spec)):
            raise UnsafePickleError(f"the pickle builds numpy.dtype({brief(spec)}); only numeric scalars are "
                                    f"accepted in a checkpoint")
        self.spec, self.byteorder = np.dtype(spec).str[1:], "<"

    def __setstate__(self, state):
        # numpy's dtype state is (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise UnsafePickleError(f"unexpected numpy.dtype state {brief(state)} in the pickle")
        self.byteorder = "<" if state[1] in ("|", "=") else state[1]


class _StateDict(collections.OrderedDict):
    """``collections.OrderedDict`` for the unpickler: torch attaches ``_metadata`` (module versions) through
    BUILD; it is dropped rather than set as an attribute."""

    def __setstate__(self, state):
        pass


def _is_plain_key(key) -> bool:
    """Whether ``key`` may be a dict key or set item: a type whose hashes a file cannot make collide (a dict of
    n colliding keys takes n**2 comparisons to build). Checkpoints key by str and int."""
    if type(key) is int:
        return -_HASH_MODULUS < key < _HASH_MODULUS
    return key is None or type(key) in (str, bytes, bool, float)


def _check_keys(keys) -> None:
    for key in keys:
        if not _is_plain_key(key):
            raise NotATorchCheckpointError(f"the pickle uses {brief(key)} as a dict key or set item; checkpoints "
                                           f"key by str and int (of less than 61 bits); {_CRAFTED}")


def _check_unique(target, keys) -> None:
    """Refuse a key set twice in one dict: torch never writes one, and a later value silently replacing an earlier
    one (two weights under one name) would load whichever came last."""
    if not isinstance(target, dict):
        return
    seen = set()
    for key in keys:
        if key in target or key in seen:
            raise NotATorchCheckpointError(f"the pickle sets the key {brief(key)} twice in one dict, which torch.save "
                                           f"never writes; {_CRAFTED}")
        seen.add(key)


def _ordered_dict(items=()):
    """``collections.OrderedDict(items)``: Python 3 pickles call it without items, Python 2 with a list of pairs."""
    pairs = items.items() if isinstance(items, dict) else items
    result = _StateDict()
    for key, value in pairs:
        _check_keys((key,))
        _check_unique(result, (key,))
        result[key] = value
    return result


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TensorClass):
        raise UnsafePickleError(f"the pickle rebuilds a tensor of an unexpected type {brief(new_type)}")
    if type(args) is not tuple:
        raise NotATorchCheckpointError(f"the pickle rebuilds a tensor from {brief(args)}, not an argument tuple")
    return func(*args)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, str)):
        raise UnsafePickleError("the pickle builds a numpy scalar from something that is not numeric bytes")
    raw = data.encode("latin1") if isinstance(data, str) else data  # Python 2 pickles carry str
    return np.frombuffer(raw, np.dtype(dtype.byteorder + dtype.spec), count=1)[0]


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol-2 pickles carry bytes (a numpy scalar's payload)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"the pickle calls _codecs.encode on {type(text).__name__} with {brief(encoding)}; "
                                f"only latin1 byte payloads are accepted")
    return text.encode("latin1")


def _torch_size(dims=()):
    if not isinstance(dims, (tuple, list)):
        raise NotATorchCheckpointError(f"the pickle builds torch.Size from {brief(dims)}, not a tuple of sizes")
    return tuple(dims)


def _allowed_globals() -> Dict[tuple, Any]:
    allowed: Dict[tuple, Any] = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TensorClass("Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorClass("Parameter"),
        ("torch", "Size"): _torch_size,
        # a numpy scalar (e.g. an 'accuracy' computed with numpy); numpy 2 moved the module
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "dtype"): _NumpyDType,
        ("_codecs", "encode"): _latin1_encode,
    }
    for name, dtype_name in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype_name)
    return allowed


# ------------------------------------------------------------------------------------- the unpickler


class _BoundedReader:
    """What the unpickler reads through: at most ``budget`` bytes in all, and never a request larger than what
    the file still holds, so a length field of 2**60 cannot become a 2**60-byte buffer."""

    def __init__(self, file, budget: int, available: int):
        self._file, self._budget, self._available = file, budget, available
        self.reached_end = False  # a read asked for more than the file holds: the file ends early

    def _grant(self, wanted: int) -> int:
        if wanted > self._available:
            self.reached_end, wanted = True, self._available
        if wanted > self._budget:
            raise CheckpointLimitError(f"the pickle is larger than MAX_PICKLE_BYTES ({MAX_PICKLE_BYTES} bytes), "
                                       f"while a state_dict's pickle holds only names and shapes; {_CRAFTED}")
        return wanted

    def _took(self, data: bytes) -> bytes:
        self._budget -= len(data)
        self._available -= len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        return self._took(self._file.read(self._grant(self._available if size < 0 else size)))

    def readline(self, size: int = -1) -> bytes:
        line = self._file.readline(min(self._budget, self._available) + 1)
        if not line.endswith(b"\n") and len(line) >= self._available:
            self.reached_end = True
        self._grant(len(line))
        return self._took(line)


class _Tally:
    """What the pickles of one file have done so far, checked against the limits as it grows."""

    __slots__ = ("opcodes", "containers", "items", "memo")

    def __init__(self):
        self.opcodes = self.containers = self.items = self.memo = 0

    def check(self) -> None:
        if self.opcodes > MAX_PICKLE_OPCODES or self.containers > MAX_CONTAINERS \
                or self.items > MAX_CONTAINER_ITEMS or self.memo > MAX_MEMO_ENTRIES:
            self._refuse()

    def _refuse(self):
        for name, count, limit in (("opcodes", self.opcodes, MAX_PICKLE_OPCODES),
                                   ("containers", self.containers, MAX_CONTAINERS),
                                   ("container items", self.items, MAX_CONTAINER_ITEMS),
                                   ("memo entries", self.memo, MAX_MEMO_ENTRIES)):
            if count > limit:
                raise CheckpointLimitError(f"the pickle runs to more than {limit} {name} (the reader's limit; a "
                                           f"state_dict needs a few dozen per tensor); {_CRAFTED}")


_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}
# opcodes torch.save never writes for a state_dict: object construction outside REDUCE (NEWOBJ, OBJ, INST),
# the global extension registry (EXT*, whose lookups are cached process-wide), out-of-band buffers and BYTEARRAY8
# (which allocates its declared length before reading it)
_REFUSED_OPCODES = {"NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "EXT1", "EXT2", "EXT4", "BYTEARRAY8", "NEXT_BUFFER",
                    "READONLY_BUFFER"}
_CONTAINER_OPCODES = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "LIST", "DICT", "TUPLE", "TUPLE1", "TUPLE2",
                      "TUPLE3", "FROZENSET", "REDUCE", "PERSID", "BINPERSID"}
_SIZED = (str, bytes, bytearray, tuple, list, dict, set, frozenset)


class _BoundedUnpickler(pickle._Unpickler):
    """The pure-Python ``pickle`` unpickler, with the allowlist, persistent ids and the limits.

    Why the pure-Python one: it runs each opcode through a dispatch table that a subclass can extend, so every
    limit is checked at the opcode that would exceed it (memo, stack, MARK depth, containers, the cost of a call)
    and BUILD sees the object it would alter -- which a pre-scan of the opcodes cannot know. It is slower than the
    C unpickler, which does not matter: a state_dict's pickle is small, its tensor bytes live outside it.
    """

    dispatch: Dict[int, Callable] = {}

    def __init__(self, reader: _BoundedReader, allowed: Dict[tuple, Any], tally: _Tally,
                 persistent: Optional[Callable] = None):
        super().__init__(reader, encoding="latin1")
        self._allowed, self._tally, self._persistent = allowed, tally, persistent
        self._callables = {id(v) for v in allowed.values() if callable(v)}
        self._names: Dict[int, str] = {}
        for (module, name), value in allowed.items():
            self._names.setdefault(id(value), f"{module}.{name}")
        self._set_aside = 0  # items on the stacks that MARK set aside

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load the global '{_cut(str(module), 60)}.{_cut(str(name), 60)}', which a state_dict "
                f"never needs (it could run code); if you trust the file, load it with torch and save only "
                f"model.state_dict()") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise NotATorchCheckpointError(f"unexpected persistent id {brief(pid)}; {_FIX_FORMAT}")
        return self._persistent(pid)

    def pop_mark(self):
        items = super().pop_mark()
        self._set_aside -= len(self.stack)
        return items

    def _describe(self, obj) -> str:
        return self._names.get(id(obj)) or f"a {type(obj).__name__}"

    # --- opcodes with checks of their own

    def load_mark(self):
        if len(self.metastack) >= MAX_NESTING_DEPTH:
            raise CheckpointLimitError(f"the pickle nests more than MAX_NESTING_DEPTH ({MAX_NESTING_DEPTH}) "
                                       f"MARKs; {_CRAFTED}")
        self._set_aside += len(self.stack)
        pickle._Unpickler.load_mark(self)

    def load_put(self):
        # PUT carries its index as text, so it could be any int; the memo is keyed by it
        index = int(self.readline()[:-1])
        if not 0 <= index < 2 ** 32:
            raise NotATorchCheckpointError(f"the pickle stores to memo index {brief(index)}; {_CRAFTED}")
        self.memo[index] = self.stack[-1]

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callables:
            raise UnsafePickleError(f"the pickle calls {self._describe(func)}, which is not an allowed function; "
                                    f"{_FIX_FORMAT}")
        if type(args) is not tuple:
            raise NotATorchCheckpointError(f"the pickle calls {self._describe(func)} with {brief(args)}, not an "
                                           f"argument tuple; {_CRAFTED}")
        # a call may copy its arguments (OrderedDict(pairs), torch.Size(dims)), and the same memoized list can be
        # passed to many calls: its length is counted at every call, before the copy is made
        self._tally.items += sum(len(a) for a in args if isinstance(a, _SIZED))
        self._tally.check()
        self.stack[-1] = func(*args)

    def load_build(self):
        # only the reader's own dict and dtype placeholders take a state; anything else -- an allowlisted
        # function or class above all -- would be altered for every later load in the process
        if len(self.stack) < 2:
            raise pickle.UnpicklingError("BUILD without an object and a state")
        target = self.stack[-2]
        if type(target) not in (_StateDict, _NumpyDType):
            raise UnsafePickleError(f"the pickle tries to alter {self._describe(target)} (BUILD), which a "
                                    f"state_dict never does; {_FIX_FORMAT}")
        pickle._Unpickler.load_build(self)


def _refuse(name: str) -> Callable:
    def refuse(self):
        raise UnsafePickleError(f"the pickle uses the {name} opcode, which a state_dict never needs; {_FIX_FORMAT}")
    return refuse


def _invalid(code: int) -> Callable:
    def invalid(self):
        raise pickle.UnpicklingError(f"invalid opcode {code:#04x}")
    return invalid


# the dict an opcode adds keys to: SETITEM's sits below its key and value, SETITEMS's below the MARK; DICT builds one
_KEY_TARGETS = {
    "SETITEM": lambda self: self.stack[-3] if len(self.stack) >= 3 else None,
    "SETITEMS": lambda self: self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None,
    "DICT": lambda self: {},
}

_KEY_POSITIONS = {  # where the keys an opcode hashes sit on the (current) stack
    "SETITEM": lambda stack: stack[-2:-1],
    "SETITEMS": lambda stack: stack[0::2],
    "DICT": lambda stack: stack[0::2],
    "ADDITEMS": lambda stack: stack,
    "FROZENSET": lambda stack: stack,
}


def _accounted(handler: Callable, name: str) -> Callable:
    """``handler`` (one opcode) with the limits checked after it; keys checked before it, for opcodes that hash."""
    makes_container = int(name in _CONTAINER_OPCODES)
    keys_of = _KEY_POSITIONS.get(name)
    target_of = _KEY_TARGETS.get(name)

    def run(self):
        if keys_of is not None:
            _check_keys(keys_of(self.stack))
        if target_of is not None:
            _check_unique(target_of(self), keys_of(self.stack))
        stack_before, memo_before = len(self.stack) + self._set_aside, len(self.memo)
        handler(self)
        stack_after = len(self.stack) + self._set_aside
        tally = self._tally
        tally.opcodes += 1
        tally.containers += makes_container
        tally.items += max(stack_before - stack_after, 0)
        tally.memo += len(self.memo) - memo_before
        tally.check()
        if stack_after > MAX_STACK_ITEMS:
            raise CheckpointLimitError(f"the pickle stacks more than MAX_STACK_ITEMS ({MAX_STACK_ITEMS}) items; "
                                       f"{_CRAFTED}")
    return run


def _dispatch_table() -> Dict[int, Callable]:
    own = {"MARK": _BoundedUnpickler.load_mark, "PUT": _BoundedUnpickler.load_put,
           "REDUCE": _BoundedUnpickler.load_reduce, "BUILD": _BoundedUnpickler.load_build}
    table = {code: _invalid(code) for code in range(256)}
    for code, handler in pickle._Unpickler.dispatch.items():
        name = _OPCODE_NAMES.get(code, f"{code:#04x}")
        table[code] = _refuse(name) if name in _REFUSED_OPCODES else _accounted(own.get(name, handler), name)
    return table


_BoundedUnpickler.dispatch = _dispatch_table()


def _unpickle(reader: _BoundedReader, what: str, allowed, tally: _Tally, persistent=None,
              truncation_possible: bool = True):
    """The next object pickled in ``reader``; a malformed pickle raises one TorchCheckpointError."""
    try:
        return _BoundedUnpickler(reader, allowed, tally, persistent).load()
    except TorchCheckpointError:
        raise
    except _UNPICKLING_ERRORS as e:
        if truncation_possible and reader.reached_end:
            raise TruncatedCheckpointError(f"the file ends inside the {what}: it is truncated; "
                                           f"{_FIX_TRUNCATED}") from None
        raise NotATorchCheckpointError(f"not a PyTorch checkpoint (unreadable {what}: {_brief_error(e)}); "
                                       f"{_FIX_FORMAT}") from None


_INT64_LIMIT = 2 ** 63  # torch's sizes, strides and offsets are int64; a file's ints can be megabytes long


def _is_index(value) -> bool:
    return type(value) is int and 0 <= value < _INT64_LIMIT


def _is_index_tuple(values) -> bool:
    return isinstance(values, tuple) and all(_is_index(v) for v in values)


def _storage_from_pid(pid, legacy: bool):
    """(storage type, key, numel, view metadata) of a ``('storage', ...)`` persistent id."""
    n = 6 if legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"):
        what = pid[0] if isinstance(pid, tuple) and pid else pid
        raise NotATorchCheckpointError(f"the pickle references {brief(what)} rather than a tensor storage (a whole "
                                       f"pickled module?); {_FIX_FORMAT}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_index(numel):
        raise NotATorchCheckpointError(f"malformed storage reference {brief(pid)}; {_FIX_FORMAT}")
    return storage_type, key, numel, (pid[5] if legacy else None)


# ------------------------------------------------------------------------------------------- tensors


def _raw_to_array(raw, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    """Elements of ``dtype`` from raw bytes in the file's byte order, as a native array."""
    if little_endian or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype)
    # big-endian files: swap through unsigned integers of the same width (works for bfloat16 as well)
    swapped = np.frombuffer(raw, np.dtype(f">u{dtype.itemsize}")).astype(f"<u{dtype.itemsize}")
    return swapped.view(dtype)


def _last_element(offset: int, shape: tuple, stride: tuple) -> int:
    return offset + sum((n - 1) * s for n, s in zip(shape, stride))


def _repeats_elements(shape: tuple, stride: tuple) -> bool:
    """Whether the view reaches some storage element twice.

    Slicing, transposing and permuting keep every dimension's stride beyond everything the smaller strides
    reach; a view that does so reaches each element once, so it never holds more elements than its storage.
    (Expanded tensors, stride 0, are the views torch writes that fail this: a state_dict holds none.)
    """
    reach = 0
    for step, size in sorted((s, n) for n, s in zip(shape, stride) if n > 1):
        if step <= reach:
            return True
        reach += (size - 1) * step
    return False


class _TensorBudget:
    """Bytes the arrays may still take: views that share a storage are each copied, but together they may not
    outgrow ``MAX_TENSOR_COPIES`` times the storages (a file could otherwise view one storage a million times)."""

    def __init__(self, storage_bytes: int):
        self.left = MAX_TENSOR_COPIES * storage_bytes

    def take(self, nbytes: int) -> None:
        if nbytes > self.left:
            raise CheckpointLimitError(f"the tensors view their storages more than MAX_TENSOR_COPIES "
                                       f"({MAX_TENSOR_COPIES}) times over; {_CRAFTED}")
        self.left -= nbytes


def _tensor_array(ref: _TensorRef, budget: _TensorBudget) -> np.ndarray:
    """The tensor as an owned, C-contiguous array; its view is checked against its storage before any copy."""
    storage, offset, shape, stride = ref.storage, ref.offset, ref.shape, ref.stride
    if not isinstance(storage, _Storage) or not _is_index(offset) or not _is_index_tuple(shape) \
            or not _is_index_tuple(stride) or len(shape) != len(stride):
        raise NotATorchCheckpointError(f"malformed tensor (offset {brief(offset)}, size {brief(shape)}, stride "
                                       f"{brief(stride)}); {_FIX_FORMAT}")
    if len(shape) > MAX_TENSOR_DIMS:
        raise CheckpointLimitError(f"a tensor of {len(shape)} dimensions (the limit is MAX_TENSOR_DIMS, "
                                   f"{MAX_TENSOR_DIMS}); {_CRAFTED}")
    data = storage.array()
    numel = math.prod(shape)
    if numel == 0:
        if math.prod(n for n in shape if n) * data.itemsize >= 2 ** 62:
            raise NotATorchCheckpointError(f"an empty tensor of size {brief(shape)}, too large for NumPy; {_CRAFTED}")
        return np.zeros(shape, data.dtype)
    last = _last_element(offset, shape, stride)
    if last >= data.size:
        raise NotATorchCheckpointError(f"a tensor of size {brief(shape)} reaches element {brief(last)} of storage "
                                       f"{brief(storage.key)}, which holds {data.size}; the file is corrupt, "
                                       f"{_FIX_TRUNCATED}")
    if _repeats_elements(shape, stride):
        raise NotATorchCheckpointError(f"a tensor of size {brief(shape)} with strides {brief(stride)} reaches "
                                       f"elements of storage {brief(storage.key)} more than once ({numel} elements "
                                       f"from {data.size}), which torch.save never writes; {_CRAFTED}")
    budget.take(numel * data.itemsize)
    # a size-1 dimension's stride is never applied; 0 keeps NumPy's byte strides from overflowing
    byte_strides = [s * data.itemsize if n > 1 else 0 for n, s in zip(shape, stride)]
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=shape, strides=byte_strides, writeable=False)
    return np.array(view, order="C")


_LEAVES = (str, bytes, bytearray, int, float, bool, type(None), np.generic)


class _Materialiser:
    """Replaces tensor placeholders by arrays; containers become plain dict / list / tuple / OrderedDict.

    The pickle's objects form a graph (the memo lets one object appear many times, even inside itself), so each
    object is converted once -- a chain of n lists each holding the next twice spells 2**n paths -- and cycles
    and nesting deeper than ``MAX_NESTING_DEPTH`` are refused instead of ending in RecursionError.
    """

    def __init__(self, budget: _TensorBudget):
        self._budget = budget
        self._done: Dict[int, Any] = {}
        self._open: set = set()

    def convert(self, obj, depth: int = 0):
        if isinstance(obj, _LEAVES):
            return obj
        key = id(obj)  # the objects stay alive in the pickle's graph while it is converted
        if key in self._done:
            return self._done[key]
        if key in self._open:
            raise NotATorchCheckpointError(f"the checkpoint contains itself (a {type(obj).__name__} holds itself); "
                                           f"{_CRAFTED}")
        if depth >= MAX_NESTING_DEPTH:
            raise CheckpointLimitError(f"the checkpoint nests containers more than MAX_NESTING_DEPTH "
                                       f"({MAX_NESTING_DEPTH}) deep; {_CRAFTED}")
        self._open.add(key)
        result = self._convert_new(obj, depth + 1)
        self._open.discard(key)
        self._done[key] = result
        return result

    def _convert_new(self, obj, depth: int):
        if isinstance(obj, _TensorRef):
            return _tensor_array(obj, self._budget)
        if type(obj) in (_StateDict, dict):
            result = collections.OrderedDict() if type(obj) is _StateDict else {}
            for k, v in obj.items():
                result[k] = self.convert(v, depth)
            return result
        if type(obj) in (list, tuple):
            items = [self.convert(v, depth) for v in obj]
            return items if type(obj) is list else tuple(items)
        if type(obj) in (set, frozenset):  # their items passed _check_keys: plain values
            return type(obj)(obj)
        raise NotATorchCheckpointError(f"a bare {type(obj).__name__} where a tensor or value was expected; "
                                       f"{_FIX_FORMAT}")


def _materialise(obj, storage_bytes: int):
    return _Materialiser(_TensorBudget(storage_bytes)).convert(obj)


# ------------------------------------------------------------------------------------------------ zip


def _open_archive(file) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise TruncatedCheckpointError(f"a zip archive without its central directory: the file is truncated or "
                                       f"corrupt; {_FIX_TRUNCATED}") from None
    except _ZIP_ERRORS as e:
        raise NotATorchCheckpointError(f"a corrupt zip archive ({_brief_error(e)}); {_FIX_TRUNCATED}") from None


def _read_at_most(member, limit: int) -> bytearray:
    """Up to ``limit`` bytes of ``member``, in pieces: memory grows with what really inflates, not with a size
    the archive declares."""
    data = bytearray()
    while len(data) < limit:
        piece = member.read(min(_READ_CHUNK, limit - len(data)))
        if not piece:
            break
        data += piece
    return data


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, what: str) -> bytearray:
    """The ``size`` bytes of member ``info``; ``size`` comes from what the pickle announces, and the member is
    read up to one byte beyond it so that a member that inflates to more is caught without inflating it all."""
    if info.flag_bits & 0x1:
        raise NotATorchCheckpointError(f"{what} is encrypted, which torch.save never does; {_FIX_FORMAT}")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise NotATorchCheckpointError(f"{what} uses zip compression method {info.compress_type}; torch.save "
                                       f"stores members uncompressed (deflate is read as well); {_FIX_FORMAT}")
    try:
        with archive.open(info) as member:
            data = _read_at_most(member, size + 1)
    except _ZIP_ERRORS as e:
        raise NotATorchCheckpointError(f"the archive is corrupt ({what}: {_brief_error(e)}); "
                                       f"{_FIX_TRUNCATED}") from None
    if len(data) != size:
        raise NotATorchCheckpointError(f"{what} holds {'more than ' if len(data) > size else ''}{len(data)} bytes, "
                                       f"its zip entry says {size}: the archive is corrupt; {_FIX_TRUNCATED}")
    return data


def _zip_byteorder(archive: zipfile.ZipFile, info: Optional[zipfile.ZipInfo]) -> str:
    if info is None:
        return "little"
    if info.file_size > 16:
        raise NotATorchCheckpointError(f"unknown byte order (a byteorder entry of {info.file_size} bytes); "
                                       f"{_FIX_FORMAT}")
    text = bytes(_read_member(archive, info, info.file_size, "the byteorder entry"))
    byteorder = text.decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise NotATorchCheckpointError(f"unknown byte order {brief(byteorder)}; {_FIX_FORMAT}")
    return byteorder


def _find_data_pkl(infos: Dict[str, zipfile.ZipInfo]) -> str:
    pickles = [n for n in infos if n.rsplit("/", 1)[-1] == "data.pkl" and n.count("/") <= 1]
    if len(pickles) != 1:
        raise NotATorchCheckpointError(f"a zip archive without a (single) <name>/data.pkl, so not a PyTorch "
                                       f"checkpoint; {_FIX_FORMAT}")
    return pickles[0]


def _load_zip(path: str, allowed) -> Any:
    with open(path, "rb") as file, _open_archive(file) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pkl_name = _find_data_pkl(infos)
        prefix = pkl_name[: -len("data.pkl")]
        byteorder = _zip_byteorder(archive, infos.get(prefix + "byteorder"))
        pkl_info = infos[pkl_name]
        if pkl_info.file_size > MAX_PICKLE_BYTES:  # checked before a byte of it is inflated
            raise CheckpointLimitError(f"data.pkl holds {pkl_info.file_size} bytes, more than MAX_PICKLE_BYTES "
                                       f"({MAX_PICKLE_BYTES}), while a state_dict's pickle holds only names and "
                                       f"shapes; {_CRAFTED}")
        pkl = _read_member(archive, pkl_info, pkl_info.file_size, "data.pkl")
        storages: Dict[str, _Storage] = {}

        def persistent(pid):
            storage_type, key, numel, _ = _storage_from_pid(pid, legacy=False)
            if key not in storages:
                storages[key] = _Storage(key, _numpy_dtype(storage_type.dtype_name), numel)
            return storages[key]

        reader = _BoundedReader(io.BytesIO(pkl), MAX_PICKLE_BYTES, len(pkl))
        obj = _unpickle(reader, "pickle data.pkl", allowed, _Tally(), persistent, truncation_possible=False)
        storage_bytes = 0
        for key, storage in storages.items():
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise NotATorchCheckpointError(f"the archive lacks the entry of storage {brief(key)}: the file is "
                                               f"corrupt; {_FIX_TRUNCATED}")
            nbytes = storage.numel * storage.dtype.itemsize
            if info.file_size != nbytes:  # checked before reading: the entry may inflate to gigabytes
                raise NotATorchCheckpointError(f"storage {brief(key)} holds {info.file_size} bytes, the pickle "
                                               f"announces {storage.numel} x {storage.dtype}; {_FIX_TRUNCATED}")
            raw = _read_member(archive, info, nbytes, f"storage {brief(key)}")
            storage.data = _raw_to_array(raw, storage.dtype, byteorder == "little")
            storage_bytes += nbytes
        return _materialise(obj, storage_bytes)


# --------------------------------------------------------------------------------------------- legacy


def _legacy_storage(storages: Dict[str, _Storage], storage_type: _StorageType, key: str, numel: int,
                    view) -> _Storage:
    """The storage (or storage view) a legacy persistent id names, registered in ``storages`` on first sight."""
    if key not in storages:
        storages[key] = _Storage(key, _numpy_dtype(storage_type.dtype_name), numel)
    root = storages[key]
    if view is None:
        return root
    # (view_key, element offset, element count) into the root storage ``key``
    if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
            and all(_is_index(v) for v in view[1:])):
        raise NotATorchCheckpointError(f"malformed storage view {brief(view)}; {_FIX_FORMAT}")
    view_key, offset, count = view
    if root.base is not None:  # torch roots every view at a real storage; chains would recurse
        raise NotATorchCheckpointError(f"storage view {brief(view_key)} views another view; {_CRAFTED}")
    if offset + count > root.numel:
        raise NotATorchCheckpointError(f"storage view {brief(view_key)} (elements {offset} to {offset + count}) "
                                       f"lies outside storage {brief(key)} of {root.numel}; {_CRAFTED}")
    if view_key not in storages:
        storages[view_key] = _Storage(view_key, root.dtype, count, root, offset)
    return storages[view_key]


def _read_legacy_storages(f, keys, storages: Dict[str, _Storage], little_endian: bool, size: int) -> int:
    """Fills the storages listed in ``keys`` from ``f``; returns their bytes. Each element count is checked
    against the pickle and the file before its bytes are read."""
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise NotATorchCheckpointError(f"malformed list of storage keys; {_FIX_FORMAT}")
    total = 0
    for key in keys:
        storage = storages.get(key)
        if storage is None or storage.base is not None:
            raise NotATorchCheckpointError(f"storage {brief(key)} is listed but never referenced; {_FIX_FORMAT}")
        header = f.read(8)
        if len(header) < 8:
            raise TruncatedCheckpointError(f"the file ends before storage {brief(key)}: it is truncated; "
                                           f"{_FIX_TRUNCATED}")
        numel = int.from_bytes(header, "little" if little_endian else "big", signed=True)
        if numel != storage.numel:
            raise NotATorchCheckpointError(f"storage {brief(key)} holds {numel} elements, the pickle announces "
                                           f"{storage.numel}: the file is corrupt; {_FIX_TRUNCATED}")
        nbytes = numel * storage.dtype.itemsize
        if f.tell() + nbytes > size:  # checked before reading, so a corrupt count cannot ask for huge memory
            raise TruncatedCheckpointError(f"the file ends inside storage {brief(key)}: it is truncated; "
                                           f"{_FIX_TRUNCATED}")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TruncatedCheckpointError(f"the file ends inside storage {brief(key)}: it is truncated; "
                                           f"{_FIX_TRUNCATED}")
        storage.data = _raw_to_array(raw, storage.dtype, little_endian)
        total += nbytes
    return total


def _load_legacy(path: str, allowed, size: int) -> Any:
    with open(path, "rb") as f:
        # the five pickles share one budget; reads go straight to the file, so the storages start where the
        # last pickle's STOP ends
        reader, tally = _BoundedReader(f, MAX_PICKLE_BYTES, size), _Tally()

        def next_pickle(what, persistent=None):
            return _unpickle(reader, what, allowed, tally, persistent)

        magic = next_pickle("magic number")
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise NotATorchCheckpointError(f"a pickle, but not a PyTorch checkpoint (no torch.save magic number); "
                                           f"{_FIX_FORMAT}")
        protocol = next_pickle("protocol version")
        if type(protocol) is not int or protocol != LEGACY_PROTOCOL:
            raise NotATorchCheckpointError(f"unsupported legacy protocol version {brief(protocol)} (expected "
                                           f"{LEGACY_PROTOCOL}); re-save the file with a recent torch.save")
        sys_info = next_pickle("system information")
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: Dict[str, _Storage] = {}

        def persistent(pid):
            storage_type, key, numel, view = _storage_from_pid(pid, legacy=True)
            return _legacy_storage(storages, storage_type, key, numel, view)

        obj = next_pickle("checkpoint object", persistent)
        keys = next_pickle("list of storage keys")
        storage_bytes = _read_legacy_storages(f, keys, storages, little_endian, size)
        return _materialise(obj, storage_bytes)


# ------------------------------------------------------------------------------------------------- entry


def load(path) -> Any:
    """The object that ``torch.save`` wrote to ``path``, tensors as NumPy arrays, nothing executed.

    Raises :class:`UnsafePickleError` for a global outside the allowlist, :class:`TruncatedCheckpointError`
    for a cut file, :class:`CheckpointLimitError` for a file beyond the reader's limits and
    :class:`NotATorchCheckpointError` for anything else that is not a ``torch.save`` file.
    """
    return load_with_format(path)[0]


def load_with_format(path):
    """(object, 'zip' or 'legacy'): ``load`` that also names the serialisation."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file; check the path")
    try:
        return _load_any(path)
    except TorchCheckpointError as e:
        detail = str(e)
        if detail.startswith(f"{path}: "):
            detail = detail[len(path) + 2:]
        raise checkpoint_error(type(e), path, detail) from None


def _load_any(path: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(6)
        f.seek(257)
        is_tar = f.read(5) == b"ustar"
    allowed = _allowed_globals()
    if head.startswith(b"PK"):
        return _load_zip(path, allowed), "zip"
    if len(head) == 0:
        raise TruncatedCheckpointError(f"the file is empty; {_FIX_TRUNCATED}")
    if head[:1] == b"\x80":  # pickle protocol 2+: the legacy stream starts with the magic number's pickle
        return _load_legacy(path, allowed, size), "legacy"
    if is_tar:
        raise NotATorchCheckpointError("a tar archive (the PyTorch 0.1 format), which is not supported; "
                                       "re-save it with a recent torch.save")
    raise NotATorchCheckpointError(f"not a PyTorch checkpoint (starts with {brief(head)}); {_FIX_FORMAT}")

"""Read PyTorch ``.pth`` files into NumPy without torch and without running code from the file.

A ``.pth`` file is a pickle, and unpickling an untrusted pickle can call any importable function. This reader
resolves only an allowlist of globals -- the handful that a ``state_dict`` (and the teachers' checkpoint dict
around it) needs -- and answers every other global with :class:`UnsafePickleError` naming it. Tensors are
rebuilt from raw storage bytes by NumPy; their views are bounds-checked before NumPy touches memory.

Two serialisations are read:

* zip (``torch.save`` since PyTorch 1.6): an archive ``<name>/data.pkl`` whose persistent ids
  ``('storage', type, key, location, numel)`` point at ``<name>/data/<key>``; ``<name>/byteorder`` says the byte
  order (little when absent).
* legacy (before 1.6, the CRD teachers' format): five consecutive pickles -- magic number, protocol version
  (1001), system info (``little_endian``), the object (persistent ids ``('storage', type, key, location, numel,
  view_metadata)``), the list of storage keys -- then, per key in that order, an 8-byte element count and the raw
  elements.

``load(path)`` returns the unpickled object with every tensor as a NumPy array (a 0-d array for scalars).
"""
import collections
import io
import math
import os
import pickle
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np


class TorchCheckpointError(ValueError):
    """A file cannot be read as a PyTorch checkpoint."""


class NotATorchCheckpointError(TorchCheckpointError):
    """The file is not a PyTorch checkpoint (or its structure is corrupt)."""


class TruncatedCheckpointError(TorchCheckpointError):
    """The file ends before the checkpoint does."""


class UnsafePickleError(TorchCheckpointError):
    """The pickle asks for a global outside the allowlist (it could run code)."""


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001

# what a malformed pickle or archive raises from inside the unpickler or zipfile
_MALFORMED = (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError,
              IndexError, KeyError, OverflowError, RecursionError)
_FIX_TRUNCATED = "copy or download it again (compare its size with the source)"
_FIX_FORMAT = "pass a file written by torch.save (a state_dict, or a dict holding one under 'model')"


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
    """Base of the reader's own placeholder objects: a pickle's BUILD opcode must not alter them."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle tries to set the state of a {type(self).__name__}, which a "
                                f"state_dict never does; {_FIX_FORMAT}")


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
        self.base, self.base_offset = base, base_offset  # legacy storage views

    def array(self) -> np.ndarray:
        if self.base is not None:
            return self.base.array()[self.base_offset:self.base_offset + self.numel]
        if self.data is None:
            raise NotATorchCheckpointError(f"storage {self.key!r} is referenced but its data is absent")
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


class _NumpyDType(_Inert):
    """``numpy.dtype(spec, align, copy)`` kept as a spec: a real dtype's ``__setstate__`` accepts flags that are
    not safe to take from a file. Only the byte order of its state is read."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec, align=False, copy=True):
        dtype = np.dtype(spec) if isinstance(spec, str) else None
        if dtype is None or dtype.kind not in "biufc":
            raise UnsafePickleError(f"the pickle builds numpy.dtype({spec!r}); only numeric scalars are "
                                    f"accepted in a checkpoint")
        self.spec, self.byteorder = dtype.str[1:], "<"

    def __setstate__(self, state):
        # numpy's dtype state is (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise UnsafePickleError(f"unexpected numpy.dtype state {state!r} in the pickle")
        self.byteorder = "<" if state[1] in ("|", "=") else state[1]


class _StateDict(collections.OrderedDict):
    """``collections.OrderedDict`` for the unpickler: torch attaches ``_metadata`` (module versions) through
    BUILD; it is dropped rather than set as an attribute."""

    def __setstate__(self, state):
        pass


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter) or not isinstance(new_type, _TensorClass):
        raise UnsafePickleError(f"the pickle rebuilds a tensor of an unexpected type {new_type!r}")
    return func(*args)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, (bytes, str)):
        raise UnsafePickleError("the pickle builds a numpy scalar from something that is not numeric bytes")
    raw = data.encode("latin1") if isinstance(data, str) else data  # Python 2 pickles carry str
    return np.frombuffer(raw, np.dtype(dtype.byteorder + dtype.spec), count=1)[0]


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode``: how protocol-2 pickles carry bytes (a numpy scalar's payload)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"the pickle calls _codecs.encode on {type(text).__name__} with {encoding!r}; only "
                                f"latin1 byte payloads are accepted")
    return text.encode("latin1")


def _torch_size(*args):
    return tuple(*args)


def _allowed_globals() -> Dict[tuple, Any]:
    allowed: Dict[tuple, Any] = {
        ("collections", "OrderedDict"): _StateDict,
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


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals from the allowlist only and hands persistent ids to a callback."""

    def __init__(self, file, path: str, allowed: Dict[tuple, Any], persistent: Optional[Callable] = None):
        super().__init__(file, encoding="latin1")
        self._path, self._allowed, self._persistent = path, allowed, persistent

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load the global '{module}.{name}', which a state_dict never needs "
                f"(it could run code); if you trust the file, load it with torch and save only "
                f"model.state_dict()") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise NotATorchCheckpointError(f"{self._path}: unexpected persistent id {pid!r}; {_FIX_FORMAT}")
        return self._persistent(pid)


def _storage_from_pid(pid, path: str, legacy: bool):
    """(storage type, key, numel, view metadata) of a ``('storage', ...)`` persistent id."""
    n = 6 if legacy else 5
    if not (isinstance(pid, tuple) and len(pid) == n and pid[0] == "storage"):
        what = pid[0] if isinstance(pid, tuple) and pid else pid
        raise NotATorchCheckpointError(f"{path}: the pickle references {what!r} rather than a tensor storage "
                                       f"(a whole pickled module?); {_FIX_FORMAT}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) \
            or numel < 0:
        raise NotATorchCheckpointError(f"{path}: malformed storage reference {pid!r}; {_FIX_FORMAT}")
    return storage_type, key, numel, (pid[5] if legacy else None)


def _raw_to_array(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
    """Elements of ``dtype`` from raw bytes in the file's byte order, as a native array."""
    if little_endian or dtype.itemsize == 1:
        return np.frombuffer(raw, dtype)
    # big-endian files: swap through unsigned integers of the same width (works for bfloat16 as well)
    swapped = np.frombuffer(raw, np.dtype(f">u{dtype.itemsize}")).astype(f"<u{dtype.itemsize}")
    return swapped.view(dtype)


def _tensor_array(ref: _TensorRef, path: str) -> np.ndarray:
    """The tensor as an owned, C-contiguous array; the view is checked to lie inside its storage."""
    storage, offset, shape, stride = ref.storage, ref.offset, ref.shape, ref.stride
    ints = lambda xs: isinstance(xs, tuple) and all(isinstance(v, int) and v >= 0 for v in xs)  # noqa: E731
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or offset < 0 or not ints(shape) \
            or not ints(stride) or len(shape) != len(stride):
        raise NotATorchCheckpointError(f"{path}: malformed tensor (offset {offset!r}, size {shape!r}, stride "
                                       f"{stride!r}); {_FIX_FORMAT}")
    data = storage.array()
    if math.prod(shape) == 0:
        return np.zeros(shape, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= data.size:
        raise NotATorchCheckpointError(f"{path}: a tensor of size {shape} reaches element {last} of storage "
                                       f"{storage.key!r}, which holds {data.size}; the file is corrupt, "
                                    f"{_FIX_TRUNCATED}")
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=shape,
                                           strides=[s * data.itemsize for s in stride], writeable=False)
    return np.array(view, order="C")


def _materialise(obj, path: str):
    """Replace tensor placeholders by arrays; containers become plain dict / list / tuple."""
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj, path)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialise(v, path)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v, path) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, path) for v in obj)
    if isinstance(obj, _Inert):
        raise NotATorchCheckpointError(f"{path}: a bare {type(obj).__name__} where a tensor or value was expected; "
                                       f"{_FIX_FORMAT}")
    return obj


def _load_zip(path: str, allowed) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TruncatedCheckpointError(f"{path}: a zip archive without its central directory: the file is "
                                       f"truncated or corrupt; {_FIX_TRUNCATED}") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pickles) != 1:
            raise NotATorchCheckpointError(f"{path}: a zip archive without a (single) <name>/data.pkl, so not a "
                                           f"PyTorch checkpoint; {_FIX_FORMAT}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in archive.namelist():
            byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise NotATorchCheckpointError(f"{path}: unknown byte order {byteorder!r}; {_FIX_FORMAT}")
        storages: Dict[str, _Storage] = {}

        def persistent(pid):
            storage_type, key, numel, _ = _storage_from_pid(pid, path, legacy=False)
            if key not in storages:
                storages[key] = _Storage(key, _numpy_dtype(storage_type.dtype_name), numel)
            return storages[key]

        try:
            obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, allowed, persistent).load()
            for key, storage in storages.items():
                raw = archive.read(f"{prefix}data/{key}")
                if len(raw) != storage.numel * storage.dtype.itemsize:
                    raise NotATorchCheckpointError(f"{path}: storage {key!r} holds {len(raw)} bytes, the pickle "
                                                   f"announces {storage.numel} x {storage.dtype}; {_FIX_TRUNCATED}")
                storage.data = _raw_to_array(raw, storage.dtype, byteorder == "little")
        except KeyError as e:
            raise NotATorchCheckpointError(f"{path}: the archive lacks {e.args[0]!r}: the file is corrupt; "
                                           f"{_FIX_TRUNCATED}") from None
        except TorchCheckpointError:
            raise
        except _MALFORMED as e:
            raise NotATorchCheckpointError(f"{path}: the archive is corrupt ({type(e).__name__}: {e}); "
                                           f"{_FIX_TRUNCATED}") from None
        return _materialise(obj, path)


def _load_legacy(path: str, allowed) -> Any:
    size = os.path.getsize(path)
    with open(path, "rb") as f:  # a buffered reader: each pickle load stops right after its STOP opcode
        def next_pickle(what, persistent=None):
            try:
                return _RestrictedUnpickler(f, path, allowed, persistent).load()
            except TorchCheckpointError:
                raise
            except EOFError:
                raise TruncatedCheckpointError(f"{path}: the file ends inside the {what}: it is truncated; "
                                               f"{_FIX_TRUNCATED}") from None
            except pickle.UnpicklingError as e:
                if "truncated" in str(e):
                    raise TruncatedCheckpointError(f"{path}: the file ends inside the {what}: it is truncated; "
                                                   f"{_FIX_TRUNCATED}") from None
                raise NotATorchCheckpointError(f"{path}: not a PyTorch checkpoint (unreadable {what}: {e}); "
                                               f"{_FIX_FORMAT}") from None
            except _MALFORMED as e:  # e.g. an allowed function called with the wrong arguments
                raise NotATorchCheckpointError(f"{path}: malformed {what} ({type(e).__name__}: {e}); "
                                               f"{_FIX_FORMAT}") from None

        magic = next_pickle("magic number")
        if magic != LEGACY_MAGIC:
            raise NotATorchCheckpointError(f"{path}: a pickle, but not a PyTorch checkpoint (no torch.save magic "
                                           f"number); {_FIX_FORMAT}")
        protocol = next_pickle("protocol version")
        if protocol != LEGACY_PROTOCOL:
            raise NotATorchCheckpointError(f"{path}: unsupported legacy protocol version {protocol!r} (expected "
                                           f"{LEGACY_PROTOCOL}); re-save the file with a recent torch.save")
        sys_info = next_pickle("system information")
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: Dict[str, _Storage] = {}

        def persistent(pid):
            storage_type, key, numel, view = _storage_from_pid(pid, path, legacy=True)
            if key not in storages:
                storages[key] = _Storage(key, _numpy_dtype(storage_type.dtype_name), numel)
            if view is None:
                return storages[key]
            # (view_key, element offset, element count) into the root storage ``key``
            if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
                raise NotATorchCheckpointError(f"{path}: malformed storage view {view!r}; {_FIX_FORMAT}")
            view_key, offset, count = view
            if view_key not in storages:
                storages[view_key] = _Storage(view_key, storages[key].dtype, count, storages[key], offset)
            return storages[view_key]

        obj = next_pickle("checkpoint object", persistent)
        keys = next_pickle("list of storage keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise NotATorchCheckpointError(f"{path}: malformed list of storage keys; {_FIX_FORMAT}")
        for key in keys:
            storage = storages.get(key)
            if storage is None or storage.base is not None:
                raise NotATorchCheckpointError(f"{path}: storage {key!r} is listed but never referenced; "
                                               f"{_FIX_FORMAT}")
            header = f.read(8)
            if len(header) < 8:
                raise TruncatedCheckpointError(f"{path}: the file ends before storage {key!r}: it is truncated; "
                                               f"{_FIX_TRUNCATED}")
            numel = int.from_bytes(header, "little" if little_endian else "big", signed=True)
            nbytes = numel * storage.dtype.itemsize
            if numel != storage.numel:
                raise NotATorchCheckpointError(f"{path}: storage {key!r} holds {numel} elements, the pickle "
                                               f"announces {storage.numel}: the file is corrupt; {_FIX_TRUNCATED}")
            if f.tell() + nbytes > size:  # checked before reading, so a corrupt count cannot ask for huge memory
                raise TruncatedCheckpointError(f"{path}: the file ends inside storage {key!r}: it is truncated; "
                                               f"{_FIX_TRUNCATED}")
            storage.data = _raw_to_array(f.read(nbytes), storage.dtype, little_endian)
        return _materialise(obj, path)


def load(path) -> Any:
    """The object that ``torch.save`` wrote to ``path``, tensors as NumPy arrays, nothing executed.

    Raises :class:`UnsafePickleError` for a global outside the allowlist, :class:`TruncatedCheckpointError`
    for a cut file and :class:`NotATorchCheckpointError` for anything that is not a ``torch.save`` file.
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
        if str(e).startswith(path):
            raise
        raise type(e)(f"{path}: {e}") from None  # raised where the path is not known


def _load_any(path: str):
    with open(path, "rb") as f:
        head = f.read(6)
    allowed = _allowed_globals()
    if head.startswith(b"PK"):
        return _load_zip(path, allowed), "zip"
    if len(head) == 0:
        raise TruncatedCheckpointError(f"{path}: the file is empty; {_FIX_TRUNCATED}")
    if head[:1] == b"\x80":  # pickle protocol 2+: the legacy stream starts with the magic number's pickle
        return _load_legacy(path, allowed), "legacy"
    with open(path, "rb") as f:
        f.seek(257)
        is_tar = f.read(5) == b"ustar"
    if is_tar:
        raise NotATorchCheckpointError(f"{path}: a tar archive (the PyTorch 0.1 format), which is not supported; "
                                       f"re-save it with a recent torch.save")
    raise NotATorchCheckpointError(f"{path}: not a PyTorch checkpoint (starts with {head!r}); {_FIX_FORMAT}")

"""Read ``.safetensors`` files (e.g. timm's ``resnet34.tv_in1k`` copies of torchvision's weights) into NumPy.

The file is 8 bytes of little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {...}}`` and the tensor bytes. The ``safetensors`` library reads it (its NumPy API, no torch);
this module first checks the header itself, so that what the library is handed is well formed and what it
allocates is bounded by the file's real size: the declared header length fits the file and ``MAX_HEADER_BYTES``;
every entry has a known dtype, a shape of at most ``MAX_TENSOR_DIMS`` non-negative sizes whose bytes equal its
offset range, and the ranges tile the data exactly (no overlap, no gap, nothing past the end: a truncated file is
caught here); no name appears twice. Every malformed file ends in ``SafetensorsFileError``, one line naming the
path and the first bad entry.
"""
import json
import math
import os
import struct
from typing import Any, Dict, Tuple

import numpy as np
import safetensors
import safetensors.numpy

from kdjax.checkpoint.torch_names import strip_data_parallel
from kdjax.checkpoint.torch_pickle import MAX_TENSOR_DIMS, TorchCheckpointError, brief, checkpoint_error

MAX_HEADER_BYTES = 100 * 2 ** 20  # the safetensors library's own limit on the JSON header
METADATA_KEY = "__metadata__"
# safetensors dtype -> NumPy dtype (little endian, as the format stores). BF16 has no NumPy dtype (see _FIX_BF16).
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_FIX_BF16 = "bfloat16 tensors have no NumPy type: save the weights as float32 (model.float()) and import that file"
_FIX = "download or convert the file again (safetensors.torch.save_file of a state_dict)"


class SafetensorsFileError(TorchCheckpointError):
    """A ``.safetensors`` file that cannot be read: malformed, truncated or over this reader's limits."""


def is_safetensors_path(path) -> bool:
    return os.fspath(path).endswith(".safetensors")


def _refuse_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"the header names {brief(duplicate)} twice")
    return dict(pairs)


def _entry_bytes(name: str, entry: Any) -> Tuple[int, int, int]:
    """(begin, end, declared bytes) of a header entry, its fields checked; ValueError says what is wrong."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"entry {brief(name)} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype == "BF16":
        raise ValueError(f"entry {brief(name)}: {_FIX_BF16}")
    if dtype not in DTYPES:
        raise ValueError(f"entry {brief(name)} has dtype {brief(dtype)}, not one of {', '.join(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(type(s) is int and s >= 0 for s in shape)):
        raise ValueError(f"entry {brief(name)} has shape {brief(shape)}, not a list of at most {MAX_TENSOR_DIMS} "
                         f"non-negative sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets):
        raise ValueError(f"entry {brief(name)} has data_offsets {brief(offsets)}, not [begin, end]")
    return offsets[0], offsets[1], math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize


def check_header(header: Dict[str, Any], data_bytes: int) -> None:
    """Raise ValueError unless every entry is well formed and the entries' byte ranges tile ``data_bytes``."""
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{METADATA_KEY} is not a map of strings")
    ranges = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        begin, end, declared = _entry_bytes(name, entry)
        if end - begin != declared:
            raise ValueError(f"entry {brief(name)} declares {declared} bytes ({entry['dtype']} {entry['shape']}) "
                             f"but spans data_offsets {entry['data_offsets']}")
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            what = "overlaps the previous entry" if begin < position else f"leaves a gap after byte {position}"
            raise ValueError(f"entry {brief(name)} at data_offsets [{begin}, {end}] {what}")
        position = end
    if position != data_bytes:
        raise ValueError(f"the entries need {position} data bytes, the file holds {data_bytes}"
                         + (" (truncated)" if position > data_bytes else ""))


def read_header(path: str) -> Tuple[Dict[str, Any], int]:
    """(header, header length) of the file at ``path``, checked (``check_header``)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise checkpoint_error(SafetensorsFileError, path, f"{size} bytes: too short for a safetensors file; "
                                                               f"{_FIX}")
        (length,) = struct.unpack("<Q", start)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise checkpoint_error(SafetensorsFileError, path,
                                   f"declares a {length}-byte header but holds {size} bytes (limit "
                                   f"MAX_HEADER_BYTES = {MAX_HEADER_BYTES}): not a safetensors file or truncated; "
                                   f"{_FIX}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        check_header(header, size - 8 - length)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise checkpoint_error(SafetensorsFileError, path, f"bad safetensors header: {brief(str(e), 200)}; "
                                                           f"{_FIX}") from None
    return header, length


def read_safetensors(path) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(state_dict, info)`` of a ``.safetensors`` file, as ``torch_import.read_torch_checkpoint`` gives for a
    ``.pth``: NumPy arrays by name (in header order), and ``info`` with ``format`` 'safetensors', ``metadata``
    (the header's ``__metadata__``), ``epoch``/``accuracy`` None, ``entries`` [] and ``stripped_prefix``."""
    path = os.fspath(path)
    header, _ = read_header(path)
    try:
        arrays = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise checkpoint_error(SafetensorsFileError, path, f"the safetensors library cannot read it: "
                                                           f"{brief(str(e), 200)}; {_FIX}") from None
    names = [k for k in header if k != METADATA_KEY]
    state_dict, stripped = strip_data_parallel({k: np.asarray(arrays[k], order="C")  # (ascontiguousarray: 0-d -> 1-d)
                                                for k in names})
    info = {"epoch": None, "accuracy": None, "format": "safetensors", "metadata": dict(header.get(METADATA_KEY, {})),
            "entries": [], "stripped_prefix": stripped}
    return state_dict, info

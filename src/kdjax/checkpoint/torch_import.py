"""Import the original PyTorch checkpoints (teachers and students) into kdjax variables, without torch.

``read_torch_checkpoint(path) -> (state_dict, info)`` reads a ``.pth`` file safely (see ``torch_pickle``), or a
``.safetensors`` file (see ``safetensors_reader``);
``import_torch(path, arch, num_classes, image_size)`` turns it into ``{'params', 'batch_stats'}`` of a zoo model,
checked entry by entry against the architecture.
"""
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from kdjax.checkpoint.torch_pickle import NotATorchCheckpointError, brief, checkpoint_error, load_with_format
from kdjax.checkpoint.torch_names import strip_data_parallel

# where checkpoint dicts keep the weights: the teachers' and students' 'model'; 'state_dict' is a common alternative
_STATE_DICT_ENTRIES = ("model", "state_dict")


def _plain(value) -> Any:
    """A Python value for ``info``: 0-d arrays and numpy scalars become int/float/bool; other arrays are dropped."""
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else None
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, np.ndarray) for v in obj.values())


def _split_checkpoint(obj, path: str) -> Tuple[Mapping, Dict[str, Any]]:
    """(state_dict, the other top-level entries) of a checkpoint dict or a bare state_dict."""
    if not isinstance(obj, Mapping):
        raise checkpoint_error(NotATorchCheckpointError, path,
                               f"holds a {type(obj).__name__}, not a state_dict or a dict with 'model'; save "
                               f"model.state_dict() (or {{'model': model.state_dict()}})")
    for entry in _STATE_DICT_ENTRIES:
        if isinstance(obj.get(entry), Mapping):
            return obj[entry], {k: v for k, v in obj.items() if k != entry}
    if _is_state_dict(obj):
        return obj, {}
    raise checkpoint_error(NotATorchCheckpointError, path,
                           f"a dict with entries {brief(sorted(map(str, obj))[:8], 120)} but neither a 'model' "
                           f"state_dict nor tensors only; save model.state_dict() (or {{'model': model.state_dict()}})")


def read_torch_checkpoint(path) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """The state_dict of a ``torch.save`` file and what the file says about it.

    A ``.safetensors`` file is read by ``safetensors_reader.read_safetensors`` (``format`` 'safetensors').
    Reads the zip and the legacy serialisation, a ``{'epoch', 'model', 'accuracy', 'optimizer'[, 'ExpID']}``
    dict or a bare state_dict; a ``module.`` prefix (DataParallel) on every key is removed. Nothing in the file is
    executed and torch is not needed.

    Returns ``(state_dict, info)``: ``state_dict`` maps PyTorch names to NumPy arrays (in file order); ``info`` is
    plain Python values: ``epoch`` and ``accuracy`` (None when absent), every other scalar entry of the checkpoint
    dict (e.g. ``ExpID``), ``format`` ('zip' or 'legacy'), ``entries`` (the checkpoint dict's keys; [] for a bare
    state_dict) and ``stripped_prefix`` (True when ``module.`` was removed).
    """
    path = os.fspath(path)
    from kdjax.checkpoint import safetensors_reader  # (no jax either)

    if safetensors_reader.is_safetensors_path(path):
        return safetensors_reader.read_safetensors(path)
    obj, serialisation = load_with_format(path)
    state_dict, others = _split_checkpoint(obj, path)
    state_dict_in_file = state_dict
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise checkpoint_error(NotATorchCheckpointError, path,
                                   f"state_dict entry {brief(key)} is a {type(value).__name__}, not a tensor; save "
                                   f"model.state_dict()")
    state_dict, stripped = strip_data_parallel(state_dict)
    info: Dict[str, Any] = {"epoch": None, "accuracy": None}
    for key, value in others.items():
        plain = _plain(value)
        if isinstance(key, str) and plain is not None:
            info[key] = plain
    if info["accuracy"] is not None:
        info["accuracy"] = float(info["accuracy"])
    info.update(format=serialisation, entries=[str(k) for k in obj] if obj is not state_dict_in_file else [],
                stripped_prefix=stripped)
    return dict(state_dict), info


def torch_to_variables(state_dict: Mapping[str, np.ndarray], arch: str, num_classes: int, image_size: int = 32,
                       source: str = "state_dict") -> dict:
    """``{'params', 'batch_stats'}`` (NumPy float32) of zoo model ``arch`` from a PyTorch state_dict.

    Every entry must have its counterpart, with the right shape, and every model variable must be present; the
    first mismatch raises ``CheckpointMismatch`` naming ``source``, the entry and the fix.
    """
    # imported here so that reading a file needs neither jax nor the zoo
    from kdjax import models
    from kdjax.checkpoint.torch_names import CheckpointMismatch, abstract_variables, convert_state_dict

    models.check_name(arch)
    model = models.create(arch, num_classes=num_classes, image_size=image_size)
    shapes = abstract_variables(model, image_size)
    try:
        return convert_state_dict(state_dict, shapes, arch=f"{arch} ({num_classes} classes)")
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"{source}: {e}") from None


def import_torch(path, arch: str, num_classes: int, image_size: int = 32) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` of zoo model ``arch`` from the PyTorch checkpoint at ``path``.

    Arrays are NumPy float32 in flax layout (conv HWIO, dense [in, out]); ``num_batches_tracked`` is dropped.
    Use ``read_torch_checkpoint`` for the stored epoch and accuracy.
    """
    state_dict, _ = read_torch_checkpoint(path)
    return torch_to_variables(state_dict, arch, num_classes, image_size, source=os.fspath(path))

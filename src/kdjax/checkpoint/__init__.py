"""Checkpoints: kdjax's orbax format, checkpoints as a run's inputs, and import of the original PyTorch teachers.

The names below are imported on first use (PEP 562): ``kdjax.checkpoint.store`` pulls in orbax and JAX, which the
torch-free ``.pth`` reader (``kdjax.checkpoint.torch_pickle``) must not need -- it is used, and tested, where JAX
cannot even start (e.g. under a 1 GiB address-space limit).
"""
import importlib

_EXPORTS = {
    "CheckpointError": "store",
    "TrainCheckpointer": "store",
    "check_meta": "store",
    "load_model": "store",
    "read_meta": "store",
    "resolve_step_dir": "store",
    "save_model": "store",
    "check_against_dataset": "inputs",
    "check_finished": "inputs",
    "fill_data_fields": "inputs",
    "fill_model_field": "inputs",
    "input_record": "inputs",
    "load_checkpoint": "inputs",
    "import_torch": "torch_import",
    "read_torch_checkpoint": "torch_import",
    "torch_to_variables": "torch_import",
    "CheckpointLimitError": "torch_pickle",
    "NotATorchCheckpointError": "torch_pickle",
    "TorchCheckpointError": "torch_pickle",
    "TruncatedCheckpointError": "torch_pickle",
    "UnsafePickleError": "torch_pickle",
    "CheckpointMismatch": "torch_names",
    "SafetensorsFileError": "safetensors_reader",
    "read_safetensors": "safetensors_reader",
}
_SUBMODULES = set(_EXPORTS.values())  # ``kdjax.checkpoint.store.X`` after a bare ``import kdjax.checkpoint``
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

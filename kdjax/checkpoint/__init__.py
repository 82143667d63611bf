"""Checkpoints: kdjax's orbax format, and import of the original PyTorch teachers."""
from kdjax.checkpoint.store import (CheckpointError, TrainCheckpointer, check_meta, load_model,  # noqa: F401
                                    resolve_step_dir, save_model)
from kdjax.checkpoint.torch_import import import_torch, read_torch_checkpoint, torch_to_variables  # noqa: F401
from kdjax.checkpoint.torch_pickle import (NotATorchCheckpointError, TorchCheckpointError,  # noqa: F401
                                           TruncatedCheckpointError, UnsafePickleError)
from kdjax.models.torch_names import CheckpointMismatch  # noqa: F401

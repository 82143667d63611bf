"""kdjax's checkpoint format (orbax) and the errors around it.

A checkpoint directory (``<workdir>/checkpoints``) holds one sub-directory per step, each with two items:
``state`` (a pytree: ``params`` and ``batch_stats``; for a run being trained also ``opt_state``, ``step``, ``key``
and the distiller's ``extra``) and ``meta`` (JSON: model, num_classes, image_size, dataset, mean, std, ...).
Teacher training, the PyTorch import and the student runs all write it; every task reads it with ``load_model``.
"""
import json
import os
from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"
META_KEYS = ("model", "num_classes", "image_size", "dataset", "mean", "std")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the task's config."""


def _manager(directory: str, keep: Optional[int] = None, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def _jsonable(meta: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(meta), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class TrainCheckpointer:
    """Saves and restores a training run's state under ``<workdir>/checkpoints`` (async save; ``wait`` before exit)."""

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
        self._mngr = _manager(self.directory, keep=keep)

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(_jsonable(meta))), force=True)

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"cannot restore step {step} from {self.directory} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}); delete that step directory to resume from an "
                                  f"earlier one, or start a fresh workdir") from e
        return out.state, dict(out.meta)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def save_model(directory: str, variables: Mapping[str, Any], meta: Mapping[str, Any], step: int = 0) -> str:
    """Write ``{'params', 'batch_stats'}`` and ``meta`` as one checkpoint step; returns the checkpoints dir."""
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    mngr = _manager(directory)
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return directory


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


def _step_dirs(path: str):
    if not os.path.isdir(path):
        return []
    return sorted((int(d), os.path.join(path, d)) for d in os.listdir(path)
                  if d.isdigit() and _is_step_dir(os.path.join(path, d)))


def resolve_step_dir(path: str) -> str:
    """The step directory that ``path`` designates: a step dir itself, a checkpoints dir (its latest step), or a
    workdir holding ``checkpoints/`` (its latest step)."""
    hint = ("give a kdjax workdir (its latest checkpoint is used), its checkpoints/ folder or one step's directory; "
            "train a teacher with configs/teacher.py or import one with configs/import_torch.py")
    if not path:
        raise CheckpointError(f"no checkpoint path given: {hint}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist: {hint}")
    if _is_step_dir(path):
        return path
    for candidate in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
        steps = _step_dirs(candidate)
        if steps:
            return steps[-1][1]
    raise CheckpointError(f"{path} holds no kdjax checkpoint: {hint}")


def load_model(path: str) -> Tuple[dict, dict]:
    """``({'params', 'batch_stats'}, meta)`` as numpy arrays from any kdjax checkpoint (see ``resolve_step_dir``)."""
    step_dir = resolve_step_dir(path)
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {step_dir} has an unreadable meta item ({e}); it is damaged: "
                              f"re-create it") from e
    try:
        restored = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    except Exception as e:
        raise CheckpointError(f"checkpoint {step_dir} is damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); re-create it or point to another step") from e
    restored = jax.device_get(restored)
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    variables = jax.tree.map(np.asarray, variables)
    return variables, meta


def check_meta(meta: Mapping[str, Any], path: str, **expected) -> None:
    """Fail with one line when the checkpoint's ``meta`` disagrees with what the task is configured for."""
    for key, want in expected.items():
        if want is None:
            continue
        have = meta.get(key)
        if have != want:
            raise CheckpointError(f"checkpoint {path} is for {key}={have!r}, but the config asks for {key}={want!r}: "
                                  f"point to a matching checkpoint or change the config")

"""Checkpoints as a run's inputs: a run consumes another only when that one finished; what it consumed is
recorded (path, step directory, content digest); the checkpoint's meta is checked against the run's model and
data, and fills the dataset fields a config leaves unset."""
import os
from typing import Any, Dict, Optional

from kdjax.checkpoint.store import (CHECKPOINT_SUBDIR, CheckpointError, check_meta, load_model, read_meta,
                                   resolve_step_dir)

DONE_MARKER = "results.json"


def check_finished(path: str, role: str, field: Optional[str] = None) -> None:
    """A run's workdir may only be consumed once the run finished (its results.json, written last and atomically);
    a checkpoints folder or one step's directory named explicitly is taken as it is."""
    path = os.path.abspath(os.path.expanduser(path))
    step_dir = resolve_step_dir(path)
    is_run_workdir = os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR))
    if not is_run_workdir or os.path.exists(os.path.join(path, DONE_MARKER)):
        return
    raise CheckpointError(f"the {role} run in {path} is unfinished (no {DONE_MARKER}): let it finish, or name one "
                          f"step explicitly, e.g. --config.{field or role + '_checkpoint'}={step_dir}")


def input_record(path: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """What a run consumed, for its results.json: the checkpoint's path, step directory and content digest."""
    return {"path": os.path.abspath(os.path.expanduser(path)), "step_dir": resolve_step_dir(path),
            "digest": meta.get("digest")}


def load_checkpoint(path: str, model: Optional[str] = None, role: str = "model", field: Optional[str] = None):
    """``(variables, meta, model_name)`` of a kdjax checkpoint checked against ``model`` (default: the model its
    meta names); fails in one line, before anything compiles, when it is missing, unfinished, damaged or for
    another model."""
    from kdjax import models
    if path:
        check_finished(path, role, field)
    variables, meta = load_model(path)
    name = model or meta.get("model")
    if not name:
        raise CheckpointError(f"the {role} checkpoint {path} does not name its model: set {role}=<model>")
    models.check_name(name)
    check_meta(meta, path, model=name)
    return variables, meta, name


def fill_model_field(config, field: str, checkpoint_field: str) -> None:
    """An unset architecture field (``teacher``) is the model its checkpoint's meta names, read without loading
    the arrays; with neither set, one line names both ways to give it."""
    if config.get(field) is not None:
        return
    path = config.get(checkpoint_field)
    if not path:
        raise CheckpointError(f"give the {field}: --config.{checkpoint_field}=DIR (its architecture is read from "
                              f"the checkpoint), or --config.{field}=<model>")
    model = read_meta(path).get("model")
    if not model:
        raise CheckpointError(f"the checkpoint {path} does not name its model: set --config.{field}=<model>")
    with config.unlocked():
        config[field] = model


def fill_data_fields(config, meta: Optional[Dict[str, Any]]) -> None:
    """Fill an unset ``dataset`` / ``image_size`` from a checkpoint's meta (else cifar100 at its own size); the
    resolved values are what the run records."""
    meta = meta or {}
    with config.unlocked():
        if config.get("dataset") is None:
            config.dataset = meta.get("dataset") or "cifar100"
        if config.get("image_size") is None and meta.get("image_size") and meta.get("dataset") == config.dataset:
            config.image_size = int(meta["image_size"])


def check_against_dataset(meta: Dict[str, Any], path: str, dataset) -> None:
    """A checkpoint must have the dataset's class count and image size (its meta says which it was made for)."""
    check_meta(meta, path, num_classes=dataset.num_classes, image_size=dataset.image_size)

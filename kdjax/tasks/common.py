"""Set-up shared by the tasks: checks that fail before any compile, data on the devices, model state."""
import ast
import dataclasses
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from kdjax import parallel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


_DISTRIBUTED_READY = False


def maybe_initialize_distributed() -> None:
    """Multi-host runs: ``jax.distributed.initialize()`` when the launcher says so (KDJAX_DISTRIBUTED=1, or the
    coordinator variables below for a manual localhost cluster); single-process runs skip it. Idempotent."""
    global _DISTRIBUTED_READY
    if _DISTRIBUTED_READY:
        return
    _DISTRIBUTED_READY = True
    coordinator = os.environ.get("KDJAX_COORDINATOR")
    if coordinator:
        if os.environ.get("KDJAX_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", os.environ["KDJAX_CPU_COLLECTIVES"])
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["KDJAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["KDJAX_PROCESS_ID"]))
    elif os.environ.get("KDJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def data_options(config) -> Dict[str, Any]:
    options = {}
    for field in ("data_dir", "manual_dir"):
        if config.get(field):
            options[field] = config[field]
    if config.get("image_size"):
        options["image_size"] = int(config.image_size)
    options.update(parse_dataset_options(config.get("dataset_options", "")))
    return options


def parse_dataset_options(text: str) -> Dict[str, Any]:
    """"num_train=640;num_classes=10" -> {'num_train': 640, 'num_classes': 10} (Python literals, else strings)."""
    options = {}
    for item in filter(None, (text or "").split(";")):
        if "=" not in item:
            raise ValueError(f"dataset_options item {item!r} is not of the form key=value (items separated by ';')")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def load_checkpoint(path: str, model: Optional[str] = None, role: str = "model"):
    """``(variables, meta, model_name)`` of a kdjax checkpoint checked against ``model`` (default: the model its
    meta names); fails in one line, before anything compiles, when it is missing, damaged or for another model."""
    from kdjax import models
    from kdjax.checkpoint import CheckpointError, check_meta, load_model
    variables, meta = load_model(path)
    name = model or meta.get("model")
    if not name:
        raise CheckpointError(f"the {role} checkpoint {path} does not name its model: set {role}=<model>")
    models.check_name(name)
    check_meta(meta, path, model=name)
    return variables, meta, name


def load_dataset(config):
    from kdjax import data
    return data.load(config.dataset, **data_options(config))


def init_variables(model, key, image_size: int):
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, train=False))(key)


def init_state(model, tx, key, image_size: int) -> Dict[str, Any]:
    variables = init_variables(model, key, image_size)
    params = variables["params"]
    return {"params": params, "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "extra": {}}


def model_meta(model_name: str, dataset, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    meta = {"model": model_name, "num_classes": int(dataset.num_classes), "image_size": int(dataset.image_size),
            "dataset": dataset.name, "mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std]}
    meta.update(extra or {})
    return meta


def make_mesh():
    return parallel.make_mesh()




def base_pad(image_size: int) -> int:
    """Zero padding of the base random crop: 4 px at 32x32, 8 px at 64x64 (the original's loaders)."""
    from kdjax.augment.base import default_pad
    return default_pad(image_size)


@dataclasses.dataclass(frozen=True)
class Training:
    """What a training task derives from its config before building the step: the recipe of SPEC section 4."""
    epochs: int
    plan: Any
    base_lr: float
    tx: Any
    schedule: Any


def training_recipe(config, dataset, mesh, model_name: str) -> Training:
    """Epochs (x epoch_factor), the epoch plan, the lr rule and the SGD optimiser with its step decay."""
    from kdjax.train import loop, optim
    epochs = int(config.epochs) * max(int(config.epoch_factor), 1)
    plan = loop.make_plan(dataset.num_train, int(config.batch_size), mesh.size,
                          loop.steps_per_dispatch_for_backend(config.steps_per_dispatch), config.last_batch)
    base_lr = optim.default_lr(model_name, config.optim.lr)
    tx, schedule = optim.make_optimizer(base_lr, plan.steps_per_epoch,
                                        optim.scaled_decay_epochs(config.optim.decay_epochs, config.epoch_factor),
                                        config.optim.decay_rate, config.optim.momentum, config.optim.weight_decay)
    return Training(epochs, plan, base_lr, tx, schedule)


def finish_training(workdir: str, config, fields: Dict[str, Any], out: Dict[str, Any], training: Training,
                    started: float, label: str) -> Dict[str, Any]:
    """results.json (DESIGN's fields) of a training run, and its closing line."""
    from kdjax import runlog
    results = {**fields, "seed": int(config.seed), "epochs": training.epochs, "test_loss": out["test_loss"],
               "top1": out["top1"], "top5": out["top5"], "wall_s": time.time() - started,
               "images_per_s": out["images_per_s"], "compile_s": out["compile_s"], "lr": training.base_lr}
    path = runlog.write_results(workdir, results, config)
    print(f"[{fields['task']}] {label} on {fields['dataset']}: test_loss {out['test_loss']:.4f} "
          f"top1 {out['top1']:.4f}; results in {path}", flush=True)
    return results

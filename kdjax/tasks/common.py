"""Set-up shared by the tasks: checks that fail before any compile, the dataset, checkpoints checked against it,
model state and the closing results."""
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


POSITIVE_FIELDS = ("epochs", "epoch_factor", "batch_size", "eval_batch_size", "keep_checkpoints", "checkpoint_every",
                   "eval_every", "steps_per_dispatch", "steps_per_forward")


def validate_run(config, *model_names) -> None:
    """The run fields every task shares, checked before any data loading or compiling: counts >= 1 (``epochs=0``
    would write a result for an untrained model, ``keep_checkpoints=0`` would delete every checkpoint), a known
    dtype, and an image size each model can run at."""
    from kdjax.configs.numbers import check_numbers
    check_numbers(config)  # lr, temperature, counts, seed, image size: their ranges
    for field in POSITIVE_FIELDS:
        if field in config and (isinstance(config[field], bool) or int(config[field]) < 1):
            raise ValueError(f"{field} must be >= 1, got {config[field]}: set --config.{field}=N with N >= 1")
    if config.get("image_size") is not None and int(config.image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {config.image_size}; leave it unset for the dataset's own size")
    if "dtype" in config:
        compute_dtype(config.dtype)
    if config.get("image_size") is not None:
        for name in model_names:
            check_model_runs_at(name, int(config.image_size))


def check_model_runs_at(name: str, image_size: int, num_classes: int = 10) -> None:
    """Trace the model's forward at ``image_size`` (shapes only, nothing compiles): an architecture whose pooling
    would shrink the image to nothing fails here in one line instead of inside compilation."""
    from kdjax import models
    model = models.create(name, num_classes, image_size)
    x = jnp.zeros((2, image_size, image_size, 3))

    def forward():
        variables = model.init(jax.random.key(0), x)
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    try:
        jax.eval_shape(forward)
    except Exception as e:  # flax and XLA raise many types for impossible shapes
        raise ValueError(f"model {name} cannot run at {image_size}x{image_size} pixels ({type(e).__name__}): use a "
                         f"larger --config.image_size") from None


def data_options(config) -> Dict[str, Any]:
    """The ``kdjax.data.load`` arguments a config sets: data_dir, manual_dir, image_size, dataset_options.*."""
    options = {k: config[k] for k in ("data_dir", "manual_dir", "image_size") if config.get(k) is not None}
    group = config.get("dataset_options")
    options.update({k: v for k, v in (group.items() if group is not None else ()) if v is not None})
    return options


def load_dataset(config):
    from kdjax import data
    return data.load(config.dataset, **data_options(config))


DONE_MARKER = "results.json"


def check_finished(path: str, role: str, field: Optional[str] = None) -> None:
    """A run's workdir may only be consumed once the run finished (its results.json, written last and atomically);
    a checkpoints folder or one step's directory named explicitly is taken as it is."""
    from kdjax.checkpoint import CheckpointError, resolve_step_dir
    from kdjax.checkpoint.store import CHECKPOINT_SUBDIR
    path = os.path.abspath(os.path.expanduser(path))
    step_dir = resolve_step_dir(path)
    is_run_workdir = os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR))
    if not is_run_workdir or os.path.exists(os.path.join(path, DONE_MARKER)):
        return
    raise CheckpointError(f"the {role} run in {path} is unfinished (no {DONE_MARKER}): let it finish, or name one "
                          f"step explicitly, e.g. --config.{field or role + '_checkpoint'}={step_dir}")


def input_record(path: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """What a run consumed, for its results.json: the checkpoint's path, step directory and content digest."""
    from kdjax.checkpoint import resolve_step_dir
    return {"path": os.path.abspath(os.path.expanduser(path)), "step_dir": resolve_step_dir(path),
            "digest": meta.get("digest")}


def load_checkpoint(path: str, model: Optional[str] = None, role: str = "model", field: Optional[str] = None):
    """``(variables, meta, model_name)`` of a kdjax checkpoint checked against ``model`` (default: the model its
    meta names); fails in one line, before anything compiles, when it is missing, unfinished, damaged or for
    another model."""
    from kdjax import models
    from kdjax.checkpoint import CheckpointError, check_meta, load_model
    if path:
        check_finished(path, role, field)
    variables, meta = load_model(path)
    name = model or meta.get("model")
    if not name:
        raise CheckpointError(f"the {role} checkpoint {path} does not name its model: set {role}=<model>")
    models.check_name(name)
    check_meta(meta, path, model=name)
    return variables, meta, name


def resolve_data(config, meta: Optional[Dict[str, Any]]) -> None:
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
    from kdjax.checkpoint import check_meta
    check_meta(meta, path, num_classes=dataset.num_classes, image_size=dataset.image_size)


def init_state(model, tx, key, image_size: int) -> Dict[str, Any]:
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(key)
    params = variables["params"]
    return {"params": params, "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32), "extra": {}}


def model_meta(model_name: str, dataset, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    meta = {"model": model_name, "num_classes": int(dataset.num_classes), "image_size": int(dataset.image_size),
            "dataset": dataset.name, "mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std]}
    meta.update(extra or {})
    return meta


def already_finished(task: str, workdir: str, config) -> Optional[Dict[str, Any]]:
    """The results of a finished run of this same config in ``workdir`` (printed), else None."""
    from kdjax import workdir as workdir_lib
    results = workdir_lib.finished_results(workdir, config)
    if results is not None:
        best = (f" (best top1 {results['best_top1']:.4f} at epoch {results['best_epoch']})"
                if "best_top1" in results else "")
        figures = (f"T. stddev {results['tstddev']:.6f}" if "tstddev" in results else
                   f"test_loss {results.get('test_loss', float('nan')):.4f} top1 {results.get('top1', float('nan')):.4f}")
        print(f"[{task}] already finished: {figures}{best}; results in {os.path.join(workdir, 'results.json')}",
              flush=True)
    return results


def start_compilation_cache(config) -> Dict[str, int]:
    """Turn on the persistent compilation cache the config names; returns the hit/miss counts so far, so that a
    run can report its own (``cache_counts_since``)."""
    from kdjax import parallel
    parallel.enable_compilation_cache(config.get("compile_cache_dir"))
    return parallel.compilation_cache_counts()


def cache_counts_since(before: Dict[str, int]) -> Dict[str, int]:
    from kdjax import parallel
    now = parallel.compilation_cache_counts()
    return {key: now[key] - before.get(key, 0) for key in now}


def run_once(task: str, workdir: str, config, body):
    """A run's frame, after its checks: answered from its results when it finished with this config before;
    otherwise ``body(config, workdir)`` runs with the workdir checked writable and locked."""
    from kdjax import workdir as workdir_lib
    done = already_finished(task, workdir, config)
    if done is not None:
        return done
    workdir_lib.check_writable(workdir)
    with workdir_lib.WorkdirLock(workdir):
        return body(config, workdir)


def finish_training(workdir: str, config, fields: Dict[str, Any], out: Dict[str, Any], recipe,
                    started: float, label: str) -> Dict[str, Any]:
    """results.json of a training run, and its closing line."""
    from kdjax import runlog
    results = {**fields, "seed": int(config.seed), "epochs": recipe.epochs, "test_loss": out["test_loss"],
               "compile_cache": cache_counts_since(out.get("cache_before", {})),
               "top1": out["top1"], "top5": out["top5"], "best_top1": out["best_top1"],
               "best_epoch": out["best_epoch"], "best_test_loss": out["best_test_loss"], "wall_s": time.time() - started,
               "images_per_s": out["images_per_s"], "compile_s": out["compile_s"], "lr": recipe.base_lr,
               "decay_epochs": list(recipe.decay_epochs)}
    path = runlog.write_results(workdir, results, config)
    print(f"[{fields['task']}] {label} on {fields['dataset']}: test_loss {out['test_loss']:.4f} "
          f"top1 {out['top1']:.4f}; results in {path}", flush=True)
    return results

"""The training driver shared by teacher and student runs: device-resident data, the epochs of
``kdjax.data.epochs`` (one permutation per epoch drawn on device), ``lax.scan`` over a chunk of steps per
dispatch, evaluation, checkpoints and exact resumption.

Determinism: the step key is ``fold_in(step_key, global_step)`` and the permutation key ``fold_in(perm_key, epoch)``,
so a run resumed from any epoch-end checkpoint replays exactly the steps an uninterrupted run takes.

A streamed dataset (``kdjax.data.streamed``: ImageNet) takes the same epochs and the same step function, fed one
global batch per dispatch by the host pipeline (prefetched to the devices) instead of the on-device gather. Its
batch of global step s is a function of s and the run's seed alone, so it also resumes from a checkpoint inside an
epoch, which ``checkpoint_every_steps`` writes.
"""
import dataclasses
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import interrupts, runlog
from kdjax.checkpoint.store import CheckpointError, TrainCheckpointer, first_non_finite
from kdjax.data import epochs as epochs_lib
from kdjax.data.placement import is_streamed
from kdjax.train.evaluate import eval_batch_size, make_evaluator
from kdjax.train import recipe as recipe_lib
from kdjax.train.recipe import Recipe
from kdjax.errors import KdjaxError
from kdjax.workdir import LockLost


class TrainingDiverged(KdjaxError, RuntimeError):
    """The loss became NaN or infinite."""


class RunInterrupted(KdjaxError, RuntimeError):
    """Ctrl-C (SIGINT) during training; the message says what was saved and how to resume."""


@dataclasses.dataclass
class Trainee:
    """What ``fit`` trains: the step (``kdjax.train.steps``), its initial state, the teacher's variables (None for
    a teacher run), the model that evaluates the state, the checkpoint's ``meta``, the run's key, the compute
    dtype (which the advice after a divergence names) and ``step_data``: values of the run that every batch dict
    carries as data (a scheme switch's index), so that runs differing only in them run one compiled program."""
    name: str
    step_fn: Callable
    state: Dict[str, Any]
    teacher_vars: Any
    eval_model: Any
    meta: Dict[str, Any]
    run_key: jax.Array
    dtype: Optional[str] = None
    step_data: Dict[str, Any] = dataclasses.field(default_factory=dict)


def make_chunk_fn(step_fn: Callable, num_steps: int, rows: int):
    """jit(scan(step)) over ``num_steps`` consecutive batches of ``rows`` rows of the epoch permutation; the state
    is donated. ``data`` is a ``kdjax.data.DeviceDataset``: each device gathers its part of every batch itself;
    ``step_data`` joins every batch dict (``Trainee.step_data``)."""
    def chunk(state, teacher_vars, data, perm, first, global_step, step_key, step_data):
        def body(state, i):
            idx = epochs_lib.batch_indices(perm, first + i * rows, rows)
            images, labels = epochs_lib.gather_rows(data, idx)
            key = jax.random.fold_in(step_key, global_step + i)
            batch = {"images": images, "labels": labels, "indices": idx, **step_data}
            return step_fn(state, teacher_vars, batch, key)

        if num_steps == 1:  # no loop at all (see kdjax.parallel.steps_per_dispatch)
            state, metrics = body(state, 0)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(body, state, jnp.arange(num_steps))

    return jax.jit(chunk, donate_argnums=0)


def make_step_fn(step_fn: Callable):
    """jit(step) on one global batch that the host pipeline fed (the streamed path); the state is donated."""
    def one(state, teacher_vars, batch, global_step, step_key, step_data):
        return step_fn(state, teacher_vars, {**batch, **step_data}, jax.random.fold_in(step_key, global_step))

    return jax.jit(one, donate_argnums=0)


def _first_bad(values: np.ndarray) -> Optional[int]:
    bad = np.nonzero(~np.isfinite(values))[0]
    return int(bad[0]) if bad.size else None


class _Executables:
    """The compiled chunk programs of a run, one per (steps, rows), compiled ahead of time on first use so that
    throughput figures never include compilation. ``build(steps, rows)`` gives the jitted function."""

    def __init__(self, build: Callable):
        self.build, self.programs, self.compile_s = build, {}, 0.0

    def get(self, steps: int, rows: int, args):
        if (steps, rows) not in self.programs:
            t0 = time.perf_counter()
            self.programs[(steps, rows)] = self.build(steps, rows).lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        return self.programs[(steps, rows)]


def fit(workdir: str, bookkeeping: recipe_lib.Bookkeeping, recipe: Recipe, trainee: Trainee, data,
        mesh) -> Dict[str, Any]:
    """Train ``trainee`` for ``recipe.epochs`` epochs (resuming from the workdir's latest checkpoint) and return
    the final evaluation with throughput figures and the final ``state``. ``data`` is a
    ``kdjax.data.DeviceDataset`` on ``mesh`` or a ``kdjax.data.streamed.StreamedDataset`` (``kdjax.data.place``);
    ``bookkeeping`` says when to evaluate and save (``checkpoint_every_steps``: a streamed ``data`` only)."""
    plan, epochs, name = recipe.plan, recipe.epochs, trainee.name
    streamed = is_streamed(data)
    every_steps = bookkeeping.checkpoint_every_steps
    if every_steps is not None and not streamed:
        raise ValueError(recipe_lib.STEP_CHECKPOINTS_STREAMED_ONLY)
    total_steps = epochs * plan.steps_per_epoch
    ckpt = TrainCheckpointer(workdir, keep=bookkeeping.keep_checkpoints)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(trainee.state, replicated)
    teacher_vars = jax.device_put(trainee.teacher_vars, replicated) if trainee.teacher_vars is not None else None

    human = runlog.ProgressLog(name)
    human.line(f"{data.name}: {data.num_train} train / {data.num_test} test images, {data.placement} on "
               f"{runlog.devices_line(mesh.size)}; {epochs} epochs of {plan.steps_per_epoch} steps, {recipe.chunk} per dispatch; "
               f"{recipe_lib.describe_schedule(recipe.base_lr, recipe.decay_epochs, recipe.decay_rate)}")
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        state, _ = ckpt.restore(latest, abstract)
        human.line(f"resuming from step {latest} (epoch {latest // plan.steps_per_epoch})")
    global_step = int(jax.device_get(state["step"]))
    if global_step % plan.steps_per_epoch and not streamed:
        raise ValueError(f"checkpoint step {global_step} is not at an epoch end of this run's plan "
                         f"({plan.steps_per_epoch} steps per epoch): the batch size or dataset changed")
    start_epoch = global_step // plan.steps_per_epoch

    perm_key, step_key = jax.random.fold_in(trainee.run_key, 1), jax.random.fold_in(trainee.run_key, 2)
    step_data = jax.device_put(trainee.step_data, replicated)
    permutation = jax.jit(lambda k, e: epochs_lib.epoch_permutation(k, e, plan.num_train))
    if streamed:
        executables = _Executables(lambda steps, rows: make_step_fn(trainee.step_fn))
        batches = _streamed_batches(data, plan, epochs, perm_key, mesh, global_step)
    else:
        executables = _Executables(lambda steps, rows: make_chunk_fn(trainee.step_fn, steps, rows))
    evaluate = make_evaluator(trainee.eval_model, data.mean, data.std,
                              eval_batch_size(bookkeeping.eval_batch_size, mesh.size), data.num_test,
                              mesh)
    log = runlog.RunLog(workdir, total_steps, name)
    log.forget_after(global_step)
    best = None  # the evaluated epoch with the highest top-1 (later KD papers report it; the paper the last)
    for row in log.evaluations():
        best = _better(best, row)
    eval_every = max(bookkeeping.eval_every, 1)
    ckpt_every = max(bookkeeping.checkpoint_every, 1)
    last_eval: Dict[str, Any] = {}
    train_seconds, train_images = 0.0, 0
    loop_started, first_step = time.perf_counter(), global_step
    last_saved = latest
    segments = epochs_lib.segments(plan, recipe.chunk, masked_tail=False)
    fix = divergence_fix(trainee.dtype)

    try:
        for epoch in range(start_epoch, epochs):
            if streamed:  # from the resumed step on, cut where a checkpoint is due
                epoch_segments = epochs_lib.split_segments(segments, global_step - epoch * plan.steps_per_epoch,
                                                           every_steps, epoch * plan.steps_per_epoch)
            else:
                perm = permutation(perm_key, epoch)
                epoch_segments = segments
            for k, seg in enumerate(epoch_segments):
                if streamed:
                    state, metrics, dt = _run_streamed(executables, state, teacher_vars, batches, seg, global_step,
                                                       step_key, step_data)
                else:
                    args = (state, teacher_vars, data, perm, seg.first_step * plan.batch_size, global_step, step_key,
                            step_data)
                    executable = executables.get(seg.steps, seg.rows, args)
                    t0 = time.perf_counter()
                    state, metrics = executable(*args)
                    metrics = jax.device_get(metrics)  # the one transfer of the chunk
                    dt = time.perf_counter() - t0
                interrupts.raise_if_pending()  # a signal whose own KeyboardInterrupt was swallowed
                losses = np.asarray(metrics["loss"], np.float64)
                bad = _first_bad(losses)
                if bad is not None:
                    raise TrainingDiverged(f"loss became {losses[bad]} at step {global_step + bad} (epoch {epoch + 1})"
                                           f"; {_last_good(ckpt.directory, last_saved)}; {fix}")
                global_step += seg.steps
                train_seconds += dt
                train_images += seg.steps * seg.rows
                lr = float(recipe.schedule(global_step - 1))
                means = {key: float(np.mean(v)) for key, v in metrics.items()}
                log.write(global_step, {"epoch": epoch + 1, "lr": lr, **means,
                                        "images_per_s": seg.steps * seg.rows / dt})
                # ETA from the wall time per step so far (evaluation and checkpoints included, compiles not)
                per_step = ((time.perf_counter() - loop_started - executables.compile_s)
                            / (global_step - first_step)) if k or epoch > start_epoch else float("nan")
                # (no ETA from the first dispatch alone: a program's first execution is slower than the rest)
                log.progress(global_step, epoch + 1, epochs, means["loss"], lr, seg.steps * seg.rows / dt, per_step,
                             force=k == len(epoch_segments) - 1)
                if every_steps and global_step % every_steps == 0 and global_step % plan.steps_per_epoch:
                    _check_state(state, global_step, epoch + 1, ckpt.directory, last_saved, fix)
                    _save_or_explain(ckpt, global_step, state, trainee.meta, last_saved)  # inside the epoch
                    last_saved = global_step
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                last_eval = evaluate({"params": state["params"], "batch_stats": state["batch_stats"]}, data)
                _check_evaluation(last_eval, epoch + 1, ckpt.directory, last_saved, fix)
                log.write(global_step, {"epoch": epoch + 1, **last_eval})
                best = _better(best, {"epoch": epoch + 1, **last_eval})
                log.human.line(f"epoch {epoch + 1} test_loss {last_eval['test_loss']:.6f} "
                               f"top1 {last_eval['top1']:.4f} top5 {last_eval['top5']:.4f}")
            if (epoch + 1) % ckpt_every == 0 or epoch + 1 == epochs or (every_steps and global_step % every_steps == 0):
                _check_state(state, global_step, epoch + 1, ckpt.directory, last_saved, fix)
                _save_or_explain(ckpt, global_step, state, trainee.meta, last_saved)
                last_saved = global_step
        if not last_eval:  # resumed a finished run: evaluate its final state
            last_eval = evaluate({"params": state["params"], "batch_stats": state["batch_stats"]}, data)
            _check_evaluation(last_eval, epochs, ckpt.directory, last_saved, fix)
            best = _better(best, {"epoch": epochs, **last_eval})
    except KeyboardInterrupt:
        saved = (f"the last checkpoint is step {last_saved} (epoch {last_saved // plan.steps_per_epoch}) in "
                 f"{ckpt.directory}" if last_saved is not None else "no checkpoint was written yet")
        raise RunInterrupted(f"interrupted at step {global_step} of {total_steps}; {saved}; run the same command "
                             f"to resume") from None
    finally:
        ckpt.close()
        log.close()
    throughput = train_images / train_seconds if train_seconds > 0 else float("nan")
    return {**last_eval, "images_per_s": throughput, "steps": global_step, "compile_s": executables.compile_s,
            "best_top1": best["top1"], "best_epoch": int(best["epoch"]), "best_test_loss": best["test_loss"],
            "state": state}


def _streamed_batches(data, plan, epochs: int, perm_key, mesh, start: int):
    """The global batches of steps ``start, start + 1, ...`` on the mesh, from the host pipeline (decode,
    RandomResizedCrop, flip) prefetched to the devices; the epoch orders come from a seed drawn from the run's
    permutation key, so a resumed run reads the very batches an uninterrupted one reads."""
    from kdjax.data.streamed import DeviceIterator, host_iterator

    seed = int(jax.random.bits(perm_key, dtype=jnp.uint32))
    return DeviceIterator(host_iterator(data.train_steps(plan, epochs, seed), start=start), mesh)


def _run_streamed(executables: _Executables, state, teacher_vars, batches, seg, global_step: int, step_key,
                  step_data):
    """The ``seg.steps`` steps of a segment, one dispatch each; their metrics are fetched together at the end, so
    the host never waits for a step before dispatching the next. Returns the seconds spent, compiles left out."""
    t0, compile_before, metrics = time.perf_counter(), executables.compile_s, []
    for i in range(seg.steps):
        args = (state, teacher_vars, next(batches), global_step + i, step_key, step_data)
        state, step_metrics = executables.get(1, seg.rows, args)(*args)
        metrics.append(step_metrics)
    metrics = jax.device_get(metrics)
    stacked = {key: np.stack([m[key] for m in metrics]) for key in metrics[0]}
    return state, stacked, time.perf_counter() - t0 - (executables.compile_s - compile_before)


def _last_good(directory: str, last_saved: Optional[int]) -> str:
    return (f"the last good checkpoint is step {last_saved} in {directory}" if last_saved is not None
            else "no checkpoint was written yet")


def divergence_fix(dtype: Optional[str]) -> str:
    """What to change after a divergence: float32 only when the run is not float32 already (telling a float32
    run to use float32 is no fix at all)."""
    return "lower --config.optim.lr" + (" or use --config.dtype=float32" if dtype not in (None, "float32") else "")


def _check_state(state, step: int, epoch: int, directory: str, last_saved: Optional[int], fix: str) -> None:
    """The loss alone can stay finite while weights or optimiser state overflow (a huge lr): the state is checked
    before every save, so that a checkpoint never holds NaN or infinite arrays."""
    bad = first_non_finite(state)
    if bad is not None:
        raise TrainingDiverged(f"the state became non-finite by step {step} (epoch {epoch}): {bad}; "
                               f"{_last_good(directory, last_saved)}; {fix}")


def _check_evaluation(row: Dict[str, Any], epoch: int, directory: str, last_saved: Optional[int], fix: str) -> None:
    bad = [key for key in ("test_loss", "top1", "top5") if not np.isfinite(float(row.get(key, 0.0)))]
    if bad:
        raise TrainingDiverged(f"the evaluation of epoch {epoch} is non-finite ({bad[0]} {row[bad[0]]}); "
                               f"{_last_good(directory, last_saved)}; {fix}")


def _save_or_explain(ckpt: TrainCheckpointer, step: int, state, meta, last_saved: Optional[int]) -> None:
    """A failed save (a full disk, a vanished mount) ends the run in one line that says which step is intact;
    orbax writes each step to a temporary directory first, so the earlier steps are untouched."""
    try:
        ckpt.save(step, state, meta)
    except (LockLost, CheckpointError):
        raise  # a lost workdir lock, a refused state: their own line says why, not "free space"
    except Exception as e:  # orbax and the OS raise many types; the message matters, not the type
        intact = f"step {last_saved} is intact" if last_saved is not None else "no earlier checkpoint exists"
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:160]
        raise CheckpointError(f"could not write checkpoint step {step} to {ckpt.directory} ({reason}); {intact}: "
                              f"free space and run the same command to resume") from None


def _better(best: Optional[Dict[str, Any]], row: Dict[str, Any]) -> Dict[str, Any]:
    """The row with the higher top-1; on a tie the earlier epoch."""
    return row if best is None or row["top1"] > best["top1"] else best

"""The training driver shared by teacher and student runs: device-resident data, one permutation per epoch drawn
on device, ``lax.scan`` over a chunk of steps per dispatch, evaluation, checkpoints and exact resumption.

Determinism: the step key is ``fold_in(step_key, global_step)`` and the permutation key ``fold_in(perm_key, epoch)``,
so a run resumed from any epoch-end checkpoint replays exactly the steps an uninterrupted run takes.
"""
import dataclasses
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import parallel, runlog
from kdjax.checkpoint.store import TrainCheckpointer
from kdjax.train.evaluate import eval_batch_size, make_evaluator


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """How an epoch of ``num_train`` examples splits into full batches, chunks and the short last batch."""
    num_train: int
    batch_size: int
    full_steps: int
    short_batch: int  # 0 when there is none (divisible, dropped by config, or not divisible over devices)
    chunk: int

    @property
    def steps_per_epoch(self) -> int:
        return self.full_steps + (1 if self.short_batch else 0)


def best_chunk(full_steps: int, steps_per_dispatch: int) -> int:
    """The largest divisor of ``full_steps`` up to ``steps_per_dispatch`` (one compiled chunk length per run),
    unless that divisor is so small that dispatch overhead would return; then ``steps_per_dispatch`` itself."""
    cap = max(1, min(steps_per_dispatch, full_steps))
    divisor = max(d for d in range(1, cap + 1) if full_steps % d == 0)
    return divisor if divisor * 4 >= cap else cap


def steps_per_dispatch_for_backend(requested: int) -> int:
    """``requested`` steps per ``lax.scan`` dispatch on accelerators; one step per dispatch, without a loop, where
    loops are slow (see ``kdjax.parallel.convolutions_in_loops_are_slow``)."""
    return 1 if parallel.convolutions_in_loops_are_slow() else max(int(requested), 1)


def make_plan(num_train: int, batch_size: int, num_devices: int, steps_per_dispatch: int,
              last_batch: str = "keep") -> EpochPlan:
    if batch_size % num_devices:
        raise ValueError(f"batch_size {batch_size} does not divide over {num_devices} devices: use a multiple of "
                         f"{num_devices} (--config.batch_size) or fewer devices (CUDA_VISIBLE_DEVICES)")
    if last_batch not in ("keep", "drop"):
        raise ValueError(f"last_batch must be 'keep' (the original's drop_last=False) or 'drop', not {last_batch!r}")
    full, short = divmod(num_train, batch_size)
    if full == 0:
        raise ValueError(f"the training set has {num_train} examples, fewer than one batch of {batch_size}: lower "
                         f"--config.batch_size")
    if short and last_batch == "keep" and short % num_devices:
        logging.warning("the short last batch (%d examples) does not divide over %d devices: it is dropped",
                        short, num_devices)
        short = 0
    if last_batch == "drop":
        short = 0
    return EpochPlan(num_train, batch_size, full, short, best_chunk(full, steps_per_dispatch))


def make_chunk_fn(step_fn: Callable, mesh, batch_size: int, num_steps: int):
    """jit(scan(step)) over ``num_steps`` consecutive batches of the epoch permutation; the state is donated.
    ``data`` is a ``kdjax.data.DeviceDataset``: each device gathers its part of every batch itself.
    ``step_fn(state, teacher_vars, images, labels, key, indices)``: ``indices`` are the batch's dataset indices."""
    batch_sharding = NamedSharding(mesh, P("data"))

    def chunk(state, teacher_vars, data, perm, first, global_step, step_key):
        def body(state, i):
            idx = jax.lax.dynamic_slice(perm, (first + i * batch_size,), (batch_size,))
            idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
            x, y = data.gather("train", idx)
            key = jax.random.fold_in(step_key, global_step + i)
            return step_fn(state, teacher_vars, x, y, key, idx)  # idx: dataset indices, for CRD's memory

        if num_steps == 1:  # no loop at all (see steps_per_dispatch_for_backend)
            state, metrics = body(state, 0)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(body, state, jnp.arange(num_steps))

    return jax.jit(chunk, donate_argnums=0)


def _first_bad(values: np.ndarray) -> Optional[int]:
    bad = np.nonzero(~np.isfinite(values))[0]
    return int(bad[0]) if bad.size else None


def fit(*, workdir: str, config, epochs: int, mesh, data, plan: EpochPlan, step_fn: Callable,
        state: Dict[str, Any], teacher_vars: Any, eval_model, eval_mean, eval_std, schedule: Callable,
        meta: Dict[str, Any], run_key: jax.Array, name: str = "train") -> Dict[str, Any]:
    """Train for ``epochs`` epochs (resuming from the workdir's latest checkpoint) and return the final
    evaluation with throughput figures. ``data`` is a ``kdjax.data.DeviceDataset``; ``config`` gives the
    bookkeeping fields (eval_every, checkpoint_every, keep_checkpoints, eval_batch_size)."""
    total_steps = epochs * plan.steps_per_epoch
    ckpt = TrainCheckpointer(workdir, keep=int(config.get("keep_checkpoints", 2)))
    state = dict(state, key=jax.random.key_data(run_key))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    teacher_vars = jax.device_put(teacher_vars, NamedSharding(mesh, P())) if teacher_vars is not None else None

    if runlog.is_main_process():
        print(f"[{name}] {data.name}: {data.num_train} train / {data.num_test} test images, {data.placement} on "
              f"{mesh.size} device(s); {plan.steps_per_epoch} steps per epoch, {plan.chunk} per dispatch", flush=True)
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        state, _ = ckpt.restore(latest, abstract)
        print(f"[{name}] resuming from step {latest} (epoch {latest // plan.steps_per_epoch})", flush=True)
    global_step = int(jax.device_get(state["step"]))
    if global_step % plan.steps_per_epoch:
        raise ValueError(f"checkpoint step {global_step} is not at an epoch end of this run's plan "
                         f"({plan.steps_per_epoch} steps per epoch): the batch size or dataset changed")
    start_epoch = global_step // plan.steps_per_epoch

    perm_key, step_key = jax.random.fold_in(run_key, 1), jax.random.fold_in(run_key, 2)
    permutation = jax.jit(lambda k, e: jax.random.permutation(jax.random.fold_in(k, e), plan.num_train))
    compiled_chunks = {}
    compile_seconds = 0.0

    def compiled_chunk(n, batch, args):
        """The executable for chunks of ``n`` steps of ``batch``, compiled ahead of time on first use, so that
        the throughput figures never include compilation."""
        nonlocal compile_seconds
        if (n, batch) not in compiled_chunks:
            t0 = time.perf_counter()
            compiled_chunks[(n, batch)] = make_chunk_fn(step_fn, mesh, batch, n).lower(*args).compile()
            compile_seconds += time.perf_counter() - t0
        return compiled_chunks[(n, batch)]

    evaluate = make_evaluator(eval_model, eval_mean, eval_std,
                              eval_batch_size(int(config.get("eval_batch_size", 500)), mesh.size),
                              data.num_test)
    log = runlog.RunLog(workdir, total_steps, name)
    eval_every = max(int(config.get("eval_every", 1)), 1)
    ckpt_every = max(int(config.get("checkpoint_every", 10)), 1)
    last_eval: Dict[str, Any] = {}
    train_seconds, train_images = 0.0, 0
    loop_started, first_step = time.perf_counter(), global_step
    last_saved = latest

    try:
        for epoch in range(start_epoch, epochs):
            perm = permutation(perm_key, epoch)
            segments = [(plan.chunk, plan.batch_size)] * (plan.full_steps // plan.chunk)
            if plan.full_steps % plan.chunk:
                segments.append((plan.full_steps % plan.chunk, plan.batch_size))
            if plan.short_batch:
                segments.append((1, plan.short_batch))
            first = 0
            for segment, (n, batch) in enumerate(segments):
                args = (state, teacher_vars, data, perm, first, global_step, step_key)
                executable = compiled_chunk(n, batch, args)
                t0 = time.perf_counter()
                state, metrics = executable(*args)
                metrics = jax.device_get(metrics)  # the one transfer of the chunk
                dt = time.perf_counter() - t0
                losses = np.asarray(metrics["loss"], np.float64)
                bad = _first_bad(losses)
                if bad is not None:
                    saved = f"the last good checkpoint is step {last_saved} in {ckpt.directory}" if last_saved \
                        is not None else "no checkpoint was written yet"
                    raise TrainingDiverged(f"loss became {losses[bad]} at step {global_step + bad} (epoch {epoch + 1})"
                                           f"; {saved}; lower --config.optim.lr or use dtype=float32")
                global_step += n
                first += n * batch
                train_seconds += dt
                train_images += n * batch
                lr = float(schedule(global_step - 1))
                means = {k: float(np.mean(v)) for k, v in metrics.items()}
                log.write(global_step, {"epoch": epoch + 1, "lr": lr, **means, "images_per_s": n * batch / dt})
                # ETA from the wall time per step so far (evaluation and checkpoints included, compiles not)
                per_step = (time.perf_counter() - loop_started - compile_seconds) / (global_step - first_step)
                log.progress(global_step, epoch + 1, epochs, means["loss"], lr, n * batch / dt, per_step,
                             force=segment == len(segments) - 1)
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
                last_eval = evaluate(variables, data)
                log.write(global_step, {"epoch": epoch + 1, **last_eval})
                if log.main:
                    print(f"[{name}] epoch {epoch + 1} test_loss {last_eval['test_loss']:.6f} "
                          f"top1 {last_eval['top1']:.4f} top5 {last_eval['top5']:.4f}", flush=True)
            if (epoch + 1) % ckpt_every == 0 or epoch + 1 == epochs:
                ckpt.save(global_step, state, meta)
                last_saved = global_step
        if not last_eval:  # resumed a finished run: evaluate its final state
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            last_eval = evaluate(variables, data)
    finally:
        ckpt.close()
        log.close()
    throughput = train_images / train_seconds if train_seconds > 0 else float("nan")
    return {**last_eval, "images_per_s": throughput, "steps": global_step, "compile_s": compile_seconds,
            "state": state}

"""The one epoch driver of training and of the T. stddev evaluator: how an epoch of ``num_train`` examples splits
into batches and dispatches, the epoch's permutation drawn on device, and the gather of a batch's rows.

An epoch is ``full_steps`` batches of ``batch_size`` rows in the order of a fresh permutation, then, when the
training set does not divide, one short batch of the remaining rows (the original's ``drop_last=False``). What
happens to that short batch is the plan's ``last_batch`` rule, stated once here:

* ``'keep'`` (training): kept when it divides over the devices, else dropped with a warning (each device must get
  the same number of rows of a training step);
* ``'drop'``: never kept;
* ``'pad'`` (T. stddev): always kept; its index vector is padded to a multiple of the device count for the gather
  and the padding is cut off again (``gather_rows``), so every example of the epoch is seen.

The full steps run in dispatches (``Segment``s) of a fixed number of step slots; the short batch is a segment of
its own, because its batch shape differs. ``chunk_length`` (training: a divisor of the full steps, so every dispatch
is the same program) and ``balanced_chunks`` (T. stddev: equal chunks whose tail slots are masked) choose the
slots.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import List, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

LAST_BATCH_RULES = ("keep", "drop", "pad")


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """``full_steps`` batches of ``batch_size`` per epoch and one ``short_batch`` (0 when there is none)."""
    num_train: int
    batch_size: int
    full_steps: int
    short_batch: int

    @property
    def steps_per_epoch(self) -> int:
        return self.full_steps + (1 if self.short_batch else 0)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def make_plan(num_train: int, batch_size: int, num_devices: int = 1, last_batch: str = "keep") -> EpochPlan:
    """The epoch's batches under the ``last_batch`` rule (module docstring)."""
    for name, value in (("num_train", num_train), ("batch_size", batch_size), ("num_devices", num_devices)):
        _check_positive_int(name, int(value) if hasattr(value, "__index__") else value)
    num_train, batch_size, num_devices = int(num_train), int(batch_size), int(num_devices)
    if last_batch not in LAST_BATCH_RULES:
        raise ValueError(f"last_batch must be one of {', '.join(LAST_BATCH_RULES)} ('keep' is the original's "
                         f"drop_last=False), not {last_batch!r}")
    if last_batch != "pad" and batch_size % num_devices:
        raise ValueError(f"batch_size {batch_size} does not divide over {num_devices} devices: use a multiple of "
                         f"{num_devices} (--config.batch_size) or fewer devices (CUDA_VISIBLE_DEVICES)")
    full, short = divmod(num_train, batch_size)
    if full == 0 and last_batch != "pad":
        raise ValueError(f"the training set has {num_train} examples, fewer than one batch of {batch_size}: lower "
                         f"--config.batch_size")
    if last_batch == "drop":
        short = 0
    elif last_batch == "keep" and short % num_devices:
        print(f"warning: the short last batch ({short} examples) does not divide over {num_devices} devices: it "
              f"is dropped", file=sys.stderr, flush=True)
        short = 0
    return EpochPlan(num_train, batch_size, full, short)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One dispatch of an epoch: ``steps`` real steps of ``rows`` rows from step ``first_step`` of the epoch, run
    by a program of ``slots`` step slots (slots past ``steps`` are masked). ``kind`` names the program."""
    kind: str   # "full" or "short"
    first_step: int
    steps: int
    rows: int
    slots: int


def chunk_length(full_steps: int, steps_per_dispatch: int) -> int:
    """Training: the largest divisor of ``full_steps`` up to ``steps_per_dispatch`` (one compiled chunk length per
    run), unless that divisor is so small that dispatch overhead would return; then ``steps_per_dispatch``."""
    cap = max(1, min(int(steps_per_dispatch), int(full_steps)))
    divisor = max(d for d in range(1, cap + 1) if full_steps % d == 0)
    return divisor if divisor * 4 >= cap else cap


def balanced_chunks(full_steps: int, steps_per_dispatch: int, steps_per_forward: int) -> tuple[int, int]:
    """T. stddev: ``(slots, steps_per_forward)`` for chunks of about ``steps_per_dispatch`` steps, balanced so
    that the last chunk of an epoch masks few slots; ``slots`` is a multiple of the steps that share one teacher
    forward (CIFAR-100: 781 full steps at 200 per dispatch and 8 per forward -> 4 chunks of 200 slots).

    Steps per forward are chosen between half and all of the requested number, whichever masks the fewest slots
    (10 steps at 8 per forward would mask 6 of 16; at 5 per forward none)."""
    if not full_steps:
        return 1, 1

    def layout(spf):
        per_chunk = -(-full_steps // -(-full_steps // max(int(steps_per_dispatch), spf)))  # balanced length
        slots = -(-per_chunk // spf) * spf
        return -(-full_steps // slots) * slots - full_steps, -spf, slots  # masked slots, then the larger forward

    top = max(1, min(int(steps_per_forward), full_steps))
    _, neg_spf, slots = min(layout(spf) for spf in range(max(1, top // 2), top + 1))
    return slots, -neg_spf


def segments(plan: EpochPlan, slots: int, masked_tail: bool) -> List[Segment]:
    """The dispatches of one epoch: the full steps in chunks of ``slots`` (the last one shorter, or, with
    ``masked_tail``, of the same program with its tail masked), then the short batch."""
    out = []
    for first in range(0, plan.full_steps, slots):
        steps = min(slots, plan.full_steps - first)
        out.append(Segment("full", first, steps, plan.batch_size, slots if masked_tail else steps))
    if plan.short_batch:
        out.append(Segment("short", plan.full_steps, 1, plan.short_batch, 1))
    return out


def split_segments(segs: List[Segment], start: int, every: Optional[int], epoch_start: int) -> List[Segment]:
    """The streamed path's dispatches of an epoch: ``segs`` from the epoch's step ``start`` on (a run resumed in
    the middle of the epoch), each also cut where the global step (``epoch_start`` + the step in the epoch) reaches
    a multiple of ``every``, so that a checkpoint every ``every`` steps falls between two dispatches."""
    out = []
    for seg in segs:
        first, end = max(seg.first_step, start), seg.first_step + seg.steps
        while first < end:
            stop = min(end, ((epoch_start + first) // every + 1) * every - epoch_start) if every else end
            out.append(dataclasses.replace(seg, first_step=first, steps=stop - first, slots=stop - first))
            first = stop
    return out


def epoch_permutation(perm_key: jax.Array, epoch, num_train: int) -> jax.Array:
    """The order of epoch ``epoch`` (0-based): drawn on device from ``fold_in(perm_key, epoch)``, so a run resumed
    at an epoch boundary replays the order an uninterrupted run takes."""
    return jax.random.permutation(jax.random.fold_in(perm_key, epoch), num_train)


def batch_indices(perm: jax.Array, first_row, rows: int) -> jax.Array:
    """``perm[first_row : first_row + rows]`` with a traced start (inside a scan over steps)."""
    return jax.lax.dynamic_slice(perm, (first_row,), (rows,))


def gather_rows(data, indices: jax.Array, split: str = "train"):
    """``data.gather`` of any number of rows: an index vector that does not divide over the mesh (a padded short
    batch) is padded for the gather and the padding cut off again; one that divides is constrained to the batch
    sharding, so each device gathers its own part."""
    rows = indices.shape[0]
    num_devices = data.mesh.devices.size
    missing = -rows % num_devices
    if not missing:
        indices = jax.lax.with_sharding_constraint(indices, NamedSharding(data.mesh, P("data")))
        return data.gather(split, indices)
    images, labels = data.gather(split, jnp.concatenate([indices, jnp.zeros([missing], indices.dtype)]))
    return images[:rows], labels[:rows]

"""The jitted, teacher-only T. stddev evaluator (docs/fidelity.md, "T. stddev").

What it computes is the original's ``--utils.check_ce_var`` run: ``epochs`` passes over the shuffled training set
in batches of ``batch_size`` with the last short batch kept (drop_last False); per step the loader's per-sample
crop+flip, normalisation, the scheme's second transform x' = A(x), and the teacher's softmax at temperature 1 on x
and on x' (in that order) as two entries of ``kdjax.tstddev.GroupedStddev``. No student is trained or run, except
the fixed eval-mode student that scores CutMixPick (S. ent.), as the original's ``--fix_student`` does. The same
probabilities of x', with each row's dominant label and the scoring student's argmax, feed the teacher-side metrics
``kdjax.tstddev.teacher_metrics.AugmentedMetrics`` (ECE, class-histogram entropy, agreement) in the same program.

Randomness (everything drawn on the device, one key per run):

* the permutation of epoch e is ``permutation(fold_in(perm_key, e), N)``;
* step t (global, 0-based, the short batch included) crops and flips with ``fold_in(base_key, t)``;
* scheme s draws its per-batch parameters with ``fold_in(fold_in(aug_key, scheme_stream_id(s)), t)``, a stream of
  its own that does not depend on which other schemes run beside it.

``run_keys``, ``epoch_permutation``, ``base_step_key`` and ``scheme_step_key`` are those derivations, so that a
reference written step by step reproduces a run exactly.

A streamed dataset (ImageNet, ImageNet-100: ``host_crop``) takes its epoch orders and its RandomResizedCrop + flip
from the host pipeline (``StreamedDataset.train_steps`` with the seed ``streamed_host_seed``), one dispatch per step;
the schemes' keys are the same ``scheme_step_key``s (``Evaluator._run_streamed``).

Several schemes at once (``aug='all'``): one compiled program advances all of them in lockstep over the same base
batches, i.e. with common random numbers: every scheme sees the same permutation and the same crop+flip of each
step, and the teacher's forward of the original batch runs once per step for all of them. Each scheme's result is
the same as a run of that scheme alone with the same seed (up to float rounding from a different batch layout); the
schemes' estimates are positively correlated, which makes their differences more precise than independent runs.

Throughput: a dispatch runs a ``lax.scan`` over blocks of ``steps_per_forward`` consecutive steps; a block is
``vmap``-ed over its steps, so the teacher runs once per block on the concatenation of the original batches and of
every augmented batch that needs a forward (one large batch instead of many small ones). Free forwards are skipped:
identity returns x itself, so t(x') = t(x); CutMixPick (T. ent.) scores its pool with the teacher, and the logits
of the picked images are taken from that pass (the original runs the teacher on them a second time; eval-mode
BatchNorm makes each row independent of the rest of the batch, so the values are the same up to rounding). The
estimator entries of a block are then added in step order by a ``lax.scan``; the states of all schemes are stacked
and updated together by ``vmap``.

Exact grouping: the full steps of an epoch are split into equal chunks of step slots; slots past the end of the
epoch carry masked (empty) entries, which the estimator ignores. The short last batch has its own (small) compiled
program, because the schemes' batch-level draws (permutations, derangements, CutMixPick's n_pick = min(n_pick, 2 x
rows)) depend on its true size.

Precision: with ``float32_exact`` the teacher and student convolutions and matmuls are traced at
``Precision.HIGHEST`` (on GPUs the default precision for float32 is TF32, 10 mantissa bits); probabilities are
always formed in float32 from the logits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.augment import transforms
from kdjax.losses import entropy
from kdjax.data import epochs as epochs_lib
from kdjax.data.epochs import epoch_permutation
from kdjax.tstddev.estimator import GroupedStddev
from kdjax.tstddev.teacher_metrics import AugmentedMetrics

ENTRIES_PER_STEP = 2     # the teacher's probabilities of x, then of x'
ENTRIES_PER_GROUP = 10   # the original's num = 10 when lw_mix is set: one group per 5 steps


# ------------------------------------------------------------------------------------------------ keys


def run_keys(seed: int) -> Dict[str, jax.Array]:
    """The three key streams of a run: permutations, base crop+flip, schemes."""
    run_key = jax.random.key(int(seed))
    return {"perm": jax.random.fold_in(run_key, 1), "base": jax.random.fold_in(run_key, 2),
            "aug": jax.random.fold_in(run_key, 3)}


def scheme_stream_id(name: str) -> int:
    """A stable 31-bit id per scheme name, so a scheme's draws do not depend on the other schemes of the run."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def scheme_stream(aug_key: jax.Array, name: str) -> jax.Array:
    return jax.random.fold_in(aug_key, scheme_stream_id(name))


def base_step_key(base_key: jax.Array, global_step) -> jax.Array:
    return jax.random.fold_in(base_key, global_step)


def scheme_step_key(aug_key: jax.Array, name: str, global_step) -> jax.Array:
    return jax.random.fold_in(scheme_stream(aug_key, name), global_step)


# ------------------------------------------------------------------------------------------------ plan


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's ``epochs`` epochs of ``epoch`` (``kdjax.data.epochs``, short batch kept: rule ``'pad'``), each
    epoch's full steps in dispatches of ``slots`` step slots (a multiple of ``steps_per_forward``, the steps that
    share one teacher forward; tail slots masked), the short batch in a program of its own."""
    epoch: epochs_lib.EpochPlan
    epochs: int
    steps_per_forward: int
    slots: int

    num_train = property(lambda self: self.epoch.num_train)
    batch_size = property(lambda self: self.epoch.batch_size)
    full_steps = property(lambda self: self.epoch.full_steps)
    short_batch = property(lambda self: self.epoch.short_batch)
    steps_per_epoch = property(lambda self: self.epoch.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def segments(self) -> List[epochs_lib.Segment]:
        return epochs_lib.segments(self.epoch, self.slots, masked_tail=True)

    def expected_groups(self, entries_per_group: int = ENTRIES_PER_GROUP) -> int:
        """Completed groups at the end: every step adds two entries, a partial group is never counted."""
        return ENTRIES_PER_STEP * self.total_steps // entries_per_group


def make_plan(num_train: int, batch_size: int, epochs: int, steps_per_dispatch: int = 200,
              steps_per_forward: int = 8) -> Plan:
    """Chunks of at most about ``steps_per_dispatch`` steps (``kdjax.data.epochs.balanced_chunks``)."""
    for name, value in (("epochs", epochs), ("steps_per_dispatch", steps_per_dispatch),
                        ("steps_per_forward", steps_per_forward)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    epoch = epochs_lib.make_plan(num_train, batch_size, last_batch="pad")
    slots, spf = epochs_lib.balanced_chunks(epoch.full_steps, steps_per_dispatch, steps_per_forward)
    return Plan(epoch, int(epochs), spf, slots)


# ------------------------------------------------------------------------------------------------ one step


@dataclasses.dataclass
class ForwardCount:
    """Rows through the teacher and the student per step, recorded while a program is traced (by batch size)."""
    teacher: Dict[int, int] = dataclasses.field(default_factory=dict)
    student: Dict[int, int] = dataclasses.field(default_factory=dict)


def _precision_context(float32_exact: bool):
    return jax.default_matmul_precision("highest") if float32_exact else contextlib.nullcontext()


def make_step_probs(teacher, schemes: Sequence[Any], *, mean, std, pad: int, student=None,
                    float32_exact: bool = True, counts: Optional[ForwardCount] = None,
                    host_crop: bool = False) -> Callable:
    """``fn(teacher_vars, student_vars, images_uint8, labels, base_key, scheme_keys) -> (probs_x, probs_aug,
    labels_aug, student_aug)``.

    One step, for an arbitrary batch: base crop+flip and normalisation (``host_crop``: normalisation only, the
    streamed source's host pipeline cropped and flipped already; ``base_key`` is then unused), each scheme's x' with its key
    (``scheme_keys`` [n_schemes]), the teacher's softmax (T = 1, float32) on x ([B, C]) and on each x' (a tuple of
    [rows_s, C]). ``student`` (a module run in eval mode) scores CutMixPick by student entropy. ``labels_aug``: per
    scheme the dominant labels of x' [rows_s] (``transforms.dominant_labels``); ``student_aug``: per scheme the
    scoring student's argmax classes of x' [rows_s] (taken from its scoring pass), or None without a student.
    """
    counts = ForwardCount() if counts is None else counts
    for scheme in schemes:
        if scheme.scorer == "student" and student is None:
            raise ValueError(f"{scheme.name} scores its pool by student entropy: pass the fixed student model")
        if scheme.needs_score_fn and scheme.criterion not in (None, "entropy"):
            raise ValueError(f"{scheme.name}: the T. stddev evaluator scores by entropy only (criterion "
                             f"'entropy'), got {scheme.criterion!r}")

    def logits_of(model, variables, images):
        return model.apply(variables, images, train=False).astype(jnp.float32)

    def step_probs(teacher_vars, student_vars, images_uint8, labels, base_key, scheme_keys):
        with _precision_context(float32_exact):
            x = (transforms.normalize(images_uint8, mean, std) if host_crop
                 else transforms.base_train_batch(base_key, images_uint8, mean, std, pad))
            batch = x.shape[0]
            pending = []          # (scheme index, images) that need a teacher forward
            ready = {}            # scheme index -> logits already known
            teacher_rows, student_rows = 0, 0
            auxes = []            # each scheme's aux: its label mixing, its picked rows
            for i, scheme in enumerate(schemes):
                score_fn = None
                if scheme.scorer == "teacher":
                    def score_fn(pool):
                        pool_logits = logits_of(teacher, teacher_vars, pool)
                        return entropy(pool_logits), pool_logits
                    teacher_rows += batch * scheme.options.mix_n_run
                elif scheme.scorer == "student":
                    def score_fn(pool):
                        pool_logits = logits_of(student, student_vars, pool)
                        return entropy(pool_logits), pool_logits
                    student_rows += batch * scheme.options.mix_n_run
                x_aug, aux = scheme(scheme_keys[i], x, labels, score_fn)
                auxes.append(aux)
                if x_aug is x:  # identity: x' is x itself, so is its teacher output
                    ready[i] = None
                elif scheme.scorer == "teacher":
                    ready[i] = aux["score_state"][aux["picked"]]
                else:
                    pending.append((i, x_aug))
            stacked = jnp.concatenate([x] + [images for _, images in pending], axis=0)
            teacher_rows += stacked.shape[0]
            all_logits = logits_of(teacher, teacher_vars, stacked)
        counts.teacher[batch] = teacher_rows
        counts.student[batch] = student_rows

        logits_x = all_logits[:batch]
        offset = batch
        for i, images in pending:
            ready[i] = all_logits[offset:offset + images.shape[0]]
            offset += images.shape[0]
        probs_x = jax.nn.softmax(logits_x, axis=-1)
        probs_aug = tuple(probs_x if ready[i] is None else jax.nn.softmax(ready[i], axis=-1)
                          for i in range(len(schemes)))
        num_classes = logits_x.shape[-1]
        labels_aug = tuple(transforms.dominant_labels(aux, labels, num_classes, p.shape[0])
                           for aux, p in zip(auxes, probs_aug))
        student_aug = tuple(jnp.argmax(aux["score_state"][aux["picked"]], axis=-1).astype(jnp.int32)
                            if scheme.scorer == "student" else None for scheme, aux in zip(schemes, auxes))
        return probs_x, probs_aug, labels_aug, student_aug

    return step_probs


# ------------------------------------------------------------------------------------------------ chunks


def _pad_rows(probs, rows: int):
    """[r, C] -> ([rows, C], mask [rows]) with zero rows appended."""
    have = probs.shape[0]
    mask = jnp.arange(rows) < have
    return jnp.pad(probs, ((0, rows - have), (0, 0))), mask


def _stack_schemes(per_scheme, rows: int, steps: int):
    """A tuple of [steps, r_s] int arrays (None: no value) -> [steps, schemes, rows] zero-padded, and the mask of the
    real values."""
    values, masks = [], []
    for v in per_scheme:
        if v is None:
            values.append(jnp.zeros((steps, rows), jnp.int32))
            masks.append(jnp.zeros((steps, rows), bool))
        else:
            values.append(jnp.pad(v, ((0, 0), (0, rows - v.shape[1]))))
            masks.append(jnp.broadcast_to(jnp.arange(rows) < v.shape[1], (steps, rows)))
    return jnp.stack(values, axis=1), jnp.stack(masks, axis=1)


def make_block_update(step_probs: Callable, estimator: GroupedStddev, metrics: AugmentedMetrics) -> Callable:
    """``update((states, metric_states), teacher_vars, student_vars, images, labels, steps, base_keys, streams,
    valid) -> (states, metric_states)``: a block of S steps (``images`` [S, B, ...], ``labels`` [S, B], global
    ``steps`` [S], ``base_keys`` [S], ``valid`` [S] bool) through one teacher forward (``step_probs`` vmapped over
    the steps), their entries added to every scheme's estimator in step order (x, then x') and their rows to the
    teacher-side metrics. Steps that are not ``valid`` add nothing."""
    vmapped = jax.vmap(step_probs, in_axes=(None, None, 0, 0, 0, 0))
    add_shared = jax.vmap(estimator.update, in_axes=(0, None, None))
    add_each = jax.vmap(estimator.update, in_axes=(0, 0, 0))
    add_metrics = jax.vmap(metrics.update)

    def update(carry, teacher_vars, student_vars, images, labels, steps, base_keys, streams, valid):
        states, metric_states = carry
        steps_per_forward = steps.shape[0]
        scheme_keys = jax.vmap(lambda t: jax.vmap(lambda s: jax.random.fold_in(s, t))(streams))(steps)
        probs_x, probs_aug, labels_aug, student_aug = vmapped(teacher_vars, student_vars, images, labels,
                                                              base_keys, scheme_keys)
        rows = max(p.shape[1] for p in probs_aug)
        padded = [jax.vmap(lambda p: _pad_rows(p, rows))(p) for p in probs_aug]
        aug = jnp.stack([p for p, _ in padded], axis=1)      # [steps, schemes, rows, C]
        aug_mask = jnp.stack([m for _, m in padded], axis=1)  # [steps, schemes, rows]

        def entry(states, j):
            mask_x = jnp.broadcast_to(valid[j], probs_x.shape[1:2])
            states = add_shared(states, probs_x[j], mask_x)
            return add_each(states, aug[j], aug_mask[j] & valid[j]), None

        states, _ = jax.lax.scan(entry, states, jnp.arange(steps_per_forward))

        # The teacher-side metrics are sums over rows, so the block's rows of each scheme are added at once.
        labels_stacked, _ = _stack_schemes(labels_aug, rows, steps_per_forward)
        student_stacked, student_mask = _stack_schemes(student_aug, rows, steps_per_forward)
        real = aug_mask & valid[:, None, None]

        def by_scheme(a):  # [steps, schemes, rows, ...] -> [schemes, steps * rows, ...]
            a = jnp.swapaxes(a, 0, 1)
            return a.reshape((a.shape[0], -1) + a.shape[3:])

        metric_states = add_metrics(metric_states, by_scheme(aug), by_scheme(labels_stacked), by_scheme(real),
                                    by_scheme(student_stacked), by_scheme(student_mask))
        return states, metric_states

    return update


def make_streamed_step_fn(step_probs: Callable, estimator: GroupedStddev, *, rows: int,
                          metrics: AugmentedMetrics) -> Callable:
    """``step(states, teacher_vars, student_vars, batch, global_step, streams) -> (states, summary)``: one step of
    the streamed source. ``batch`` is the global batch the host pipeline cropped and flipped (``TrainBatch`` with
    ``pad_to``): its first ``rows`` rows are the step's real batch, the rest is padding (masked on the host) that
    is cut off here, before the schemes draw their batch-level parameters (partners, CutMixPick's pool) from it."""
    accumulate = make_block_update(step_probs, estimator, metrics)

    def step(states, teacher_vars, student_vars, batch, global_step, streams):
        images, labels = batch["images"][:rows], batch["labels"][:rows]
        steps = jnp.reshape(global_step, (1,))
        states = accumulate(states, teacher_vars, student_vars, images[None], labels[None], steps,
                            jnp.zeros((1,), jnp.uint32), streams, jnp.ones((1,), bool))
        return states, jax.vmap(estimator.result_arrays)(states[0])

    return step


def make_chunk_fn(step_probs: Callable, estimator: GroupedStddev, *, batch: int, slots: int,
                  steps_per_forward: int, metrics: AugmentedMetrics) -> Callable:
    """``chunk(states, teacher_vars, student_vars, data, perm, first_row, n_valid, global_step, base_key,
    streams) -> (states, summary)``.

    Runs ``slots`` steps of ``batch`` rows: step j (0-based) takes ``perm[first_row + j * batch :][:batch]``, has
    global step ``global_step + j`` and counts only if ``j < n_valid``. ``states`` is the pair (estimator states,
    ``metrics`` states) of all schemes, each stacked on a leading axis; ``streams`` [n_schemes] the schemes' key
    streams (``scheme_stream``). ``summary`` is ``GroupedStddev.result_arrays`` of every scheme after the chunk
    ([n_schemes] arrays).
    """
    if slots % steps_per_forward:
        raise ValueError(f"slots ({slots}) must be a multiple of steps_per_forward ({steps_per_forward})")
    blocks = slots // steps_per_forward
    accumulate = make_block_update(step_probs, estimator, metrics)

    def chunk(states, teacher_vars, student_vars, data, perm, first_row, n_valid, global_step, base_key, streams):
        def block(carry, b):
            local = b * steps_per_forward + jnp.arange(steps_per_forward)
            idx = jax.vmap(lambda j: epochs_lib.batch_indices(perm, first_row + j * batch, batch))(local)
            images, labels = epochs_lib.gather_rows(data, idx.reshape(-1))
            images = images.reshape((steps_per_forward, batch) + images.shape[1:])
            labels = labels.reshape((steps_per_forward, batch))
            steps = global_step + local
            base_keys = jax.vmap(base_step_key, in_axes=(None, 0))(base_key, steps)
            return accumulate(carry, teacher_vars, student_vars, images, labels, steps, base_keys, streams,
                              local < n_valid), None

        if blocks == 1:  # no loop around the teacher forward (slow on XLA:CPU, see kdjax.parallel)
            states, _ = block(states, 0)
        else:
            states, _ = jax.lax.scan(block, states, jnp.arange(blocks))
        return states, jax.vmap(estimator.result_arrays)(states[0])

    return chunk


def stacked_init(estimator, n: int):
    """``estimator.init()`` (a GroupedStddev's, an AugmentedMetrics') for ``n`` schemes, stacked on axis 0."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), estimator.init())


# ------------------------------------------------------------------------------------------------ driver


@dataclasses.dataclass(frozen=True)
class ChunkReport:
    """What a progress callback gets after every dispatch (values of every scheme, in the run's order)."""
    epoch: int            # 1-based
    step_in_epoch: int    # steps of this epoch done
    global_step: int      # steps of the run done
    total_steps: int
    groups: List[int]
    tstddev: List[float]
    mean_entropy: List[float]
    images_per_s: float   # teacher rows per second over the run so far
    eta_s: float
    epoch_end: bool


@dataclasses.dataclass
class Evaluator:
    """The compiled programs of one evaluation, and ``run``, the host loop around them.

    ``teacher`` / ``student``: flax modules (apply(variables, x, train=False) -> logits); ``schemes``: created
    ``kdjax.augment`` schemes (n_pick set to the batch size for CutMixPick); ``mean``/``std``/``pad``: the dataset's
    normalisation and the base crop padding.
    """
    teacher: Any
    schemes: Sequence[Any]
    num_classes: int
    plan: Plan
    mean: Sequence[float]
    std: Sequence[float]
    pad: int
    student: Any = None
    float32_exact: bool = True
    se_buckets: int = 256
    host_crop: bool = False  # the data is a streamed source: crop + flip done on the host (``make_step_probs``)

    def __post_init__(self):
        names = [s.name for s in self.schemes]
        if not names:
            raise ValueError("the evaluator needs at least one scheme")
        if len(set(names)) != len(names):
            raise ValueError(f"each scheme may appear once; got {names}")
        self.estimator = GroupedStddev(int(self.num_classes), ENTRIES_PER_GROUP, self.se_buckets)
        self.metrics = AugmentedMetrics(int(self.num_classes))
        self.counts = ForwardCount()
        self._step_probs = make_step_probs(self.teacher, self.schemes, mean=self.mean, std=self.std, pad=self.pad,
                                           student=self.student, float32_exact=self.float32_exact,
                                           counts=self.counts, host_crop=self.host_crop)
        self._programs = None  # {"full": compiled, "short": compiled}, made by ``compile``
        self._mesh = None      # the streamed programs' mesh
        # the initial states of all schemes in one program (eager, every array of zeros compiles one of its own)
        self._fresh_states = jax.jit(lambda: (stacked_init(self.estimator, len(self.schemes)),
                                              stacked_init(self.metrics, len(self.schemes))))
        self.compile_s = 0.0

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.schemes]

    def _inputs(self, mesh, teacher_vars, student_vars, seed):
        """Everything but the dataset, replicated on ``mesh`` (the compiled programs expect that placement)."""
        keys = run_keys(seed)
        replicated = NamedSharding(mesh, P())
        put = lambda tree: jax.device_put(tree, replicated)  # noqa: E731
        return {"teacher_vars": put(teacher_vars), "student_vars": put(student_vars or {}),
                "perm_key": keys["perm"], "base_key": put(keys["base"]),
                "streams": put(jnp.stack([scheme_stream(keys["aug"], name) for name in self.names])),
                "states": put(self._fresh_states()), "replicated": replicated}

    def _check_placement(self, data) -> bool:
        """True for a streamed source; the evaluator's ``host_crop`` must say the same."""
        from kdjax.data.placement import is_streamed

        streamed = is_streamed(data)
        if streamed != self.host_crop:
            raise ValueError(f"the evaluator was built with host_crop={self.host_crop} for "
                             f"{'a streamed' if streamed else 'an on-device'} dataset: set host_crop={streamed}")
        return streamed

    def compile(self, teacher_vars, data, student_vars=None, seed: int = 0, mesh=None) -> float:
        """Compile the programs ahead of the loop, so that the loop's time is execution only; returns seconds.
        ``data``: a ``DeviceDataset``, or a ``StreamedDataset`` with the ``mesh`` to run on (default all devices)."""
        if self._programs is not None:
            return self.compile_s
        if self._check_placement(data):
            return self._compile_streamed(teacher_vars, data, student_vars, seed, mesh)
        t0 = time.perf_counter()
        plan = self.plan
        inputs = self._inputs(data.mesh, teacher_vars, student_vars, seed)
        replicated = inputs["replicated"]
        perm = jax.device_put(jnp.zeros([plan.num_train], jnp.int32), replicated)
        zero = jnp.zeros([], jnp.int32)
        programs = {}
        for kind, batch, slots, spf in (("full", plan.batch_size, plan.slots, plan.steps_per_forward),
                                        ("short", plan.short_batch, 1, 1)):
            if batch == 0 or (kind == "full" and plan.full_steps == 0):
                continue
            fn = jax.jit(make_chunk_fn(self._step_probs, self.estimator, batch=batch, slots=slots,
                                       steps_per_forward=spf, metrics=self.metrics),
                         donate_argnums=0, out_shardings=replicated)
            programs[kind] = fn.lower(inputs["states"], inputs["teacher_vars"], inputs["student_vars"], data, perm,
                                      zero, zero, zero, inputs["base_key"], inputs["streams"]).compile()
        self._programs = programs
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def _streamed_layout(self, mesh) -> Dict[str, tuple]:
        """``{kind: (rows, padded rows)}`` of the full and short steps: the host pads every global batch to a
        multiple of the device count (``TrainBatch``'s ``pad_to``)."""
        plan = self.plan
        pad = lambda rows: -(-rows // mesh.size) * mesh.size  # noqa: E731
        kinds = {"full": plan.batch_size} if plan.full_steps else {}
        if plan.short_batch:
            kinds["short"] = plan.short_batch
        return {kind: (rows, pad(rows)) for kind, rows in kinds.items()}

    def _compile_streamed(self, teacher_vars, data, student_vars, seed: int, mesh) -> float:
        from kdjax import parallel

        t0 = time.perf_counter()
        mesh = mesh if mesh is not None else parallel.make_mesh()
        inputs = self._inputs(mesh, teacher_vars, student_vars, seed)
        sharded = NamedSharding(mesh, P(mesh.axis_names[0]))
        size = data.image_size
        programs = {}
        for kind, (rows, padded) in self._streamed_layout(mesh).items():
            batch = {"images": jax.ShapeDtypeStruct((padded, size, size, 3), jnp.uint8, sharding=sharded),
                     "labels": jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=sharded),
                     "indices": jax.ShapeDtypeStruct((padded,), jnp.int32, sharding=sharded),
                     "mask": jax.ShapeDtypeStruct((padded,), jnp.bool_, sharding=sharded)}
            fn = jax.jit(make_streamed_step_fn(self._step_probs, self.estimator, rows=rows, metrics=self.metrics),
                         donate_argnums=0, out_shardings=inputs["replicated"])
            programs[kind] = fn.lower(inputs["states"], inputs["teacher_vars"], inputs["student_vars"], batch,
                                      jnp.zeros([], jnp.int32), inputs["streams"]).compile()
        self._programs, self._mesh = programs, mesh
        self.compile_s = time.perf_counter() - t0
        return self.compile_s

    def teacher_rows_per_step(self, batch: Optional[int] = None) -> int:
        """Teacher rows actually run by one step of ``batch`` rows (default the full batch); known once compiled."""
        return self.counts.teacher.get(self.plan.batch_size if batch is None else batch, 0)

    def run(self, teacher_vars, data, student_vars=None, seed: int = 0,
            on_chunk: Optional[Callable[[ChunkReport], None]] = None, mesh=None) -> Dict[str, Any]:
        """Evaluate every scheme; returns {'results': {name: {tstddev, tstddev_se, groups, mean_entropy, ece,
        aug_top1, class_histogram_entropy, agreement, aug_rows}} (``kdjax.tstddev.teacher_metrics``),
        'eval_s', 'compile_s', 'teacher_rows', 'images_per_s', 'steps', ...}. ``data``: a
        ``kdjax.data.DeviceDataset`` (its mesh is the programs' mesh), or a ``kdjax.data.streamed.StreamedDataset``
        (``_run_streamed``; ``mesh``: default all devices).

        ``on_chunk`` is called after every dispatch; its numbers are fetched one dispatch late, so that the host
        never waits for the device before queueing the next dispatch.
        """
        plan = self.plan
        if data.num_train != plan.num_train:
            raise ValueError(f"the plan was made for {plan.num_train} training examples, the data has "
                             f"{data.num_train}: make the plan from the same dataset")
        if self._check_placement(data):
            return self._run_streamed(teacher_vars, data, student_vars, seed, on_chunk, mesh)
        self.compile(teacher_vars, data, student_vars, seed)
        inputs = self._inputs(data.mesh, teacher_vars, student_vars, seed)
        permutation = jax.jit(epoch_permutation, static_argnums=2, out_shardings=inputs["replicated"])
        states = inputs["states"]
        segments = plan.segments()
        rows_per_step = {"full": self.teacher_rows_per_step(plan.batch_size),
                         "short": self.teacher_rows_per_step(plan.short_batch)}
        done_rows, global_step = 0, 0
        report = _Reporter(on_chunk, plan)
        for epoch in range(plan.epochs):
            perm = permutation(inputs["perm_key"], epoch, plan.num_train).astype(jnp.int32)
            for k, seg in enumerate(segments):
                states, summary = self._programs[seg.kind](
                    states, inputs["teacher_vars"], inputs["student_vars"], data, perm,
                    jnp.int32(seg.first_step * plan.batch_size), jnp.int32(seg.steps), jnp.int32(global_step),
                    inputs["base_key"], inputs["streams"])
                global_step += seg.steps
                done_rows += seg.steps * rows_per_step[seg.kind]
                report.after(summary, epoch + 1, seg.first_step + seg.steps, global_step, done_rows,
                             k == len(segments) - 1)
        return self._finish(states, report, done_rows, global_step, rows_per_step)

    def _finish(self, states, report: "_Reporter", done_rows: int, global_step: int, rows_per_step: dict) -> dict:
        final = jax.device_get(states)
        eval_s = time.perf_counter() - report.t0
        report.flush()
        results = {name: {**self.estimator.result(jax.tree.map(lambda a, i=i: a[i], final[0])),
                          **self.metrics.result(jax.tree.map(lambda a, i=i: a[i], final[1]))}
                   for i, name in enumerate(self.names)}
        return {"results": results, "eval_s": eval_s, "compile_s": self.compile_s, "teacher_rows": done_rows,
                "images_per_s": done_rows / eval_s if eval_s > 0 else float("nan"), "steps": global_step,
                "teacher_rows_per_step": rows_per_step["full"],
                "student_rows_per_step": self.counts.student.get(self.plan.batch_size, 0)}

    def _run_streamed(self, teacher_vars, data, student_vars, seed: int, on_chunk, mesh) -> Dict[str, Any]:
        """The streamed source's loop: one dispatch per step, on the global batches that the host pipeline reads,
        crops and flips (``StreamedDataset.train_steps``: each process its share, every image of an epoch once,
        padded to the device count), prefetched to the devices. The epoch orders and the host crops come from a
        seed drawn from the run's permutation key; the schemes' keys are the on-device path's
        (``scheme_step_key``). The states are replicated, so every process holds the results of the whole
        batch: the reduction over processes happens inside the step."""
        from kdjax.data.streamed import DeviceIterator, host_iterator

        plan = self.plan
        self.compile(teacher_vars, data, student_vars, seed, mesh)
        mesh = self._mesh
        inputs = self._inputs(mesh, teacher_vars, student_vars, seed)
        host_seed = streamed_host_seed(seed)
        steps = data.train_steps(plan.epoch, plan.epochs, host_seed, pad_to=mesh.size)
        batches = DeviceIterator(host_iterator(steps), mesh)
        layout = self._streamed_layout(mesh)
        rows_per_step = {"full": self.teacher_rows_per_step(plan.batch_size),
                         "short": self.teacher_rows_per_step(plan.short_batch)}
        states, done_rows, global_step = inputs["states"], 0, 0
        report = _Reporter(on_chunk, plan)
        for epoch in range(plan.epochs):
            for k in range(plan.steps_per_epoch):
                kind = "full" if k < plan.full_steps else "short"
                batch = next(batches)
                if batch["images"].shape[0] != layout[kind][1]:  # the host pipeline and this plan disagree
                    raise RuntimeError(f"step {global_step}: the host sent {batch['images'].shape[0]} rows, "
                                       f"the {kind} program takes {layout[kind][1]}")
                states, summary = self._programs[kind](states, inputs["teacher_vars"], inputs["student_vars"],
                                                       batch, jnp.int32(global_step), inputs["streams"])
                global_step += 1
                done_rows += rows_per_step[kind]
                report.after(summary, epoch + 1, k + 1, global_step, done_rows, k == plan.steps_per_epoch - 1)
        return self._finish(states, report, done_rows, global_step, rows_per_step)


def streamed_host_seed(seed: int) -> int:
    """The seed of the streamed source's epoch orders and host crops (``StreamedDataset.train_steps``), drawn from
    the run's permutation key as the streamed training loop draws its own."""
    return int(jax.random.bits(run_keys(seed)["perm"], dtype=jnp.uint32))


class _Reporter:
    """Calls ``on_chunk`` with a ``ChunkReport`` after every dispatch, one dispatch late (``after`` keeps the
    summary, the next ``after`` or ``flush`` fetches it), so that the host never waits for the device before
    queueing the next dispatch."""

    def __init__(self, on_chunk, plan: Plan):
        self.on_chunk, self.plan, self.pending, self.t0 = on_chunk, plan, None, time.perf_counter()

    def after(self, summary, epoch: int, step_in_epoch: int, step: int, rows: int, epoch_end: bool) -> None:
        self.flush()
        self.pending = (summary, epoch, step_in_epoch, step, rows, epoch_end)

    def flush(self) -> None:
        item, self.pending = self.pending, None
        if self.on_chunk is None or item is None:
            return
        summary, epoch, step_in_epoch, step, rows, epoch_end = item
        summary = jax.device_get(summary)
        elapsed = time.perf_counter() - self.t0
        rate = step / elapsed if elapsed > 0 else 0.0
        total = self.plan.total_steps
        self.on_chunk(ChunkReport(epoch=epoch, step_in_epoch=step_in_epoch, global_step=step, total_steps=total,
                                  groups=[int(g) for g in summary["groups"]],
                                  tstddev=[float(v) for v in summary["tstddev"]],
                                  mean_entropy=[float(v) for v in summary["mean_entropy"]],
                                  images_per_s=rows / elapsed if elapsed > 0 else float("nan"),
                                  eta_s=(total - step) / rate if rate > 0 else float("nan"), epoch_end=epoch_end))


def expected_groups(num_train: int, batch_size: int, epochs: int) -> int:
    """The original's group count: 2 entries per step, 10 per group (CIFAR-100, 10 epochs: 1,564)."""
    steps = epochs * math.ceil(num_train / batch_size)
    return ENTRIES_PER_STEP * steps // ENTRIES_PER_GROUP


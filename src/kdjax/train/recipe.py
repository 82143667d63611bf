"""The paper's training recipe: SGD, momentum 0.9, coupled weight decay 5e-4 on every parameter, lr 0.05 (0.01
for MobileNetV2 / ShuffleV1 / ShuffleV2), per-epoch step decay x0.1 after epochs 150/180/210 of 240 (1-based
epochs, strict ``epoch > milestone``), ``epoch_factor`` k scaling the epochs and the milestones (see
docs/fidelity.md). The milestones are fractions of the run by default (150/240, 180/240, 210/240 of
epochs x epoch_factor), so that a shortened run anneals as the paper's does; ``optim.decay_epochs`` gives absolute
ones.

A run's config is read once, at its checks: ``training_spec`` resolves the run fields (the lr rule and the
milestones included, so that a bad value is refused before anything loads) into a ``TrainingSpec``, which the layers
below the tasks take instead of the config; ``make_recipe`` derives the ``Recipe`` from it with the epoch plan once
the dataset's size and the devices are known.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax import models, parallel
from kdjax.data import epochs as epochs_lib

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
    if config.get("checkpoint_every_steps") is not None and int(config.checkpoint_every_steps) < 1:
        raise ValueError(f"checkpoint_every_steps must be >= 1, got {config.checkpoint_every_steps}; leave it unset "
                         "to save at epoch ends only")
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


STEP_CHECKPOINTS_STREAMED_ONLY = (
    "checkpoint_every_steps applies to the streamed datasets (imagenet, imagenet100), whose runs resume inside an "
    "epoch; an in-memory dataset saves at epoch ends: unset it and use --config.checkpoint_every=EPOCHS")


def check_streamed_fields(config) -> None:
    """The placement (``kdjax.data.placement.check_placement``) and the fields that only a streamed dataset can
    honour, once the run's dataset is known (before any loading)."""
    from kdjax.data import streams
    from kdjax.data.placement import check_placement

    check_placement(config)
    if config.get("checkpoint_every_steps") is not None and not streams(config.dataset):
        raise ValueError(STEP_CHECKPOINTS_STREAMED_ONLY)


def check_batches(spec: "TrainingSpec", num_train: int) -> None:
    """The batch size against the dataset and the devices, before a run claims its workdir (``make_plan``'s one
    line when the batch is larger than the dataset or does not divide over the devices)."""
    epochs_lib.make_plan(num_train, spec.batch_size, jax.device_count(), spec.last_batch)


def init_state(model, tx, key, image_size: int) -> Dict[str, Any]:
    """A freshly initialised training state: the model's params and BatchNorm statistics, the optimiser state,
    the step and ``extra`` (a distiller's heads and state, filled by ``kdjax.train.kd``)."""
    x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)

    def fresh(k):  # one program: the optimiser's zeros outside it would each compile a program of their own
        variables = model.init(k, x, train=False)
        params = variables["params"]
        return {"params": params, "batch_stats": variables.get("batch_stats", {}), "opt_state": tx.init(params),
                "step": jnp.zeros((), jnp.int32), "extra": {}}

    return jax.jit(fresh)(key)


def model_meta(model_name: str, dataset, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``meta`` item of a checkpoint (see the README's checkpoint conventions)."""
    meta = {"model": model_name, "num_classes": int(dataset.num_classes), "image_size": int(dataset.image_size),
            "dataset": dataset.name, "mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std]}
    meta.update(extra or {})
    return meta

# The original forces lr 0.01 for these students/teachers; kdjax uses it only when optim.lr is None.
LOW_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def default_lr(model_name: str, lr: Optional[float]) -> float:
    """An explicit lr wins (a deliberate deviation: the original overrides even the command line)."""
    if lr is not None:
        return float(lr)
    return 0.01 if model_name in LOW_LR_MODELS else 0.05


# The paper's milestones as fractions of its 240 epochs: the default, so that a shortened run anneals too.
PAPER_DECAY_FRACTIONS = (150 / 240, 180 / 240, 210 / 240)


def milestones_from_fractions(fractions: Sequence[float], total_epochs: int) -> tuple:
    """Milestone k = max(1, floor(f_k * E + 0.5)) of a run of E epochs (E = 240 gives 150/180/210, E = 960
    600/720/840, E = 10 6/8/9)."""
    return tuple(max(1, int(f * total_epochs + 0.5)) for f in fractions)


def decay_milestones(optim, epochs: int, epoch_factor: int) -> tuple:
    """The run's absolute 1-based milestones: ``optim.decay_epochs`` (x epoch_factor) when given, else
    ``optim.decay_fractions`` (default the paper's) of epochs x epoch_factor. Setting both is an error."""
    if optim.get("decay_epochs") is not None and optim.get("decay_fractions") is not None:
        raise ValueError("set either optim.decay_fractions (milestones as fractions of the run) or "
                         "optim.decay_epochs (absolute milestones), not both")
    if optim.get("decay_epochs") is not None:
        return scaled_decay_epochs(optim.decay_epochs, epoch_factor)
    fractions = optim.get("decay_fractions")
    fractions = PAPER_DECAY_FRACTIONS if fractions is None else tuple(float(f) for f in fractions)
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"optim.decay_fractions must lie in (0, 1], got {fractions}")
    return milestones_from_fractions(fractions, int(epochs) * max(int(epoch_factor), 1))


def describe_schedule(base_lr: float, decay_epochs: Sequence[int], decay_rate: float) -> str:
    after = ", ".join(map(str, decay_epochs)) or "never"
    return f"lr {base_lr:g}, x{decay_rate:g} after epochs {after}"


def scaled_decay_epochs(decay_epochs: Sequence[int], epoch_factor: int) -> tuple:
    """``epoch_factor`` k scales the milestones as it scales the epochs (k=4: 960 epochs, decays 600/720/840)."""
    return tuple(int(e) * max(int(epoch_factor), 1) for e in decay_epochs)


def step_decay_schedule(base_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int], decay_rate: float = 0.1):
    """lr as a function of the optimiser step: constant inside an epoch, x ``decay_rate`` after each milestone.

    Update ``count`` belongs to the 1-based epoch ``count // steps_per_epoch + 1``, which is past milestone m from
    count ``m * steps_per_epoch`` on: the boundaries of ``optax.piecewise_constant_schedule``."""
    boundaries = {}
    for m in sorted(decay_epochs):  # a milestone given twice decays twice there (short runs round onto one epoch)
        count = int(m) * int(steps_per_epoch)
        boundaries[count] = boundaries.get(count, 1.0) * float(decay_rate)
    return optax.piecewise_constant_schedule(float(base_lr), boundaries)


def make_optimizer(base_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int], decay_rate: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 5e-4):
    """PyTorch SGD semantics: d = g + wd * p; buf = momentum * buf + d (buf starts at d); p -= lr * buf."""
    schedule = step_decay_schedule(base_lr, steps_per_epoch, decay_epochs, decay_rate)
    tx = optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum if momentum else None, nesterov=False))
    return tx, schedule


@dataclasses.dataclass(frozen=True)
class Bookkeeping:
    """When ``loop.fit`` evaluates and saves, and what it keeps: a run's settings beside its recipe."""
    eval_every: int = 1                            # epochs between test evaluations (the last is always evaluated)
    checkpoint_every: int = 10                     # epochs between checkpoints (the last is always saved)
    keep_checkpoints: int = 2
    eval_batch_size: int = 500
    checkpoint_every_steps: Optional[int] = None   # streamed datasets: also inside epochs, every N steps


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """A training run's fields, read from its config once (``training_spec``, at the checks) and passed on as
    data: the model trained, its seed and compute dtype, what ``make_recipe`` needs besides the data's size, and
    the bookkeeping."""
    model: str
    seed: int
    dtype: str
    epochs: int                  # epochs x epoch_factor
    batch_size: int
    last_batch: str
    steps_per_dispatch: int      # requested; ``parallel.steps_per_dispatch`` decides on this backend
    base_lr: float
    decay_epochs: tuple          # absolute, 1-based milestones
    decay_rate: float
    momentum: float
    weight_decay: float
    bookkeeping: Bookkeeping


def _optional_int(value) -> Optional[int]:
    return None if value is None else int(value)


def training_spec(config, model_name: str) -> TrainingSpec:
    """The run fields of a training config (``validate_run`` checked them), resolved for ``model_name``: epochs x
    epoch_factor, the lr rule and the milestones."""
    optim = config.optim
    bookkeeping = Bookkeeping(eval_every=int(config.eval_every), checkpoint_every=int(config.checkpoint_every),
                              keep_checkpoints=int(config.keep_checkpoints),
                              eval_batch_size=int(config.eval_batch_size),
                              checkpoint_every_steps=_optional_int(config.get("checkpoint_every_steps")))
    return TrainingSpec(model=model_name, seed=int(config.seed), dtype=config.dtype,
                        epochs=int(config.epochs) * max(int(config.epoch_factor), 1),
                        batch_size=int(config.batch_size), last_batch=config.last_batch,
                        steps_per_dispatch=int(config.steps_per_dispatch),
                        base_lr=default_lr(model_name, optim.lr),
                        decay_epochs=decay_milestones(optim, config.epochs, config.epoch_factor),
                        decay_rate=float(optim.decay_rate), momentum=float(optim.momentum),
                        weight_decay=float(optim.weight_decay), bookkeeping=bookkeeping)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a training run derives from its ``TrainingSpec`` and its data before building its step."""
    epochs: int                  # epochs x epoch_factor
    plan: epochs_lib.EpochPlan
    chunk: int                   # train steps per dispatch
    base_lr: float
    decay_epochs: tuple          # absolute, 1-based milestones
    decay_rate: float
    tx: optax.GradientTransformation
    schedule: Callable
    momentum: float = 0.9
    weight_decay: float = 5e-4


def make_recipe(spec: TrainingSpec, num_train: int, num_devices: int) -> Recipe:
    """The epoch plan of ``num_train`` examples over ``num_devices``, the dispatch chunk and the SGD optimiser with
    its step decay."""
    plan = epochs_lib.make_plan(num_train, spec.batch_size, num_devices, spec.last_batch)
    chunk = epochs_lib.chunk_length(plan.full_steps, parallel.steps_per_dispatch(spec.steps_per_dispatch))
    tx, schedule = make_optimizer(spec.base_lr, plan.steps_per_epoch, spec.decay_epochs, spec.decay_rate,
                                  spec.momentum, spec.weight_decay)
    return Recipe(spec.epochs, plan, chunk, spec.base_lr, spec.decay_epochs, spec.decay_rate, tx, schedule,
                  spec.momentum, spec.weight_decay)

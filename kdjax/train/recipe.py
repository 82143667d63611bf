"""The paper's training recipe: SGD, momentum 0.9, coupled weight decay 5e-4 on every parameter, lr 0.05 (0.01
for MobileNetV2 / ShuffleV1 / ShuffleV2), per-epoch step decay x0.1 after epochs 150/180/210 of 240 (1-based
epochs, strict ``epoch > milestone``), ``epoch_factor`` k scaling the epochs and the milestones (see
docs/fidelity.md). The milestones are fractions of the run by default (150/240, 180/240, 210/240 of
epochs x epoch_factor), so that a shortened run anneals as the paper's does; ``optim.decay_epochs`` gives absolute
ones. ``make_recipe`` derives all of it, with the epoch plan, from a training config.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import optax

from kdjax import parallel
from kdjax.data import epochs as epochs_lib

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
class Recipe:
    """What a training run derives from its config before building its step."""
    epochs: int                  # epochs x epoch_factor
    plan: epochs_lib.EpochPlan
    chunk: int                   # train steps per dispatch
    base_lr: float
    decay_epochs: tuple          # absolute, 1-based milestones
    decay_rate: float
    tx: optax.GradientTransformation
    schedule: Callable


def make_recipe(config, num_train: int, num_devices: int, model_name: str) -> Recipe:
    """Epochs (x epoch_factor), the epoch plan, the lr rule and the SGD optimiser with its step decay."""
    epochs = int(config.epochs) * max(int(config.epoch_factor), 1)
    plan = epochs_lib.make_plan(num_train, int(config.batch_size), num_devices, config.last_batch)
    chunk = epochs_lib.chunk_length(plan.full_steps, parallel.steps_per_dispatch(config.steps_per_dispatch))
    base_lr = default_lr(model_name, config.optim.lr)
    decay_epochs = decay_milestones(config.optim, config.epochs, config.epoch_factor)
    tx, schedule = make_optimizer(base_lr, plan.steps_per_epoch, decay_epochs, config.optim.decay_rate,
                                  config.optim.momentum, config.optim.weight_decay)
    return Recipe(epochs, plan, chunk, base_lr, decay_epochs, float(config.optim.decay_rate), tx, schedule)

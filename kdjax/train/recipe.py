"""The paper's training recipe: SGD, momentum 0.9, coupled weight decay 5e-4 on every parameter, lr 0.05 (0.01
for MobileNetV2 / ShuffleV1 / ShuffleV2), per-epoch step decay x0.1 after epochs 150/180/210 of 240 (1-based
epochs, strict ``epoch > milestone``), ``epoch_factor`` k scaling the epochs and the milestones (see
docs/fidelity.md). ``make_recipe`` derives all of it, with the epoch plan, from a training config.
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


def scaled_decay_epochs(decay_epochs: Sequence[int], epoch_factor: int) -> tuple:
    """``epoch_factor`` k scales the milestones as it scales the epochs (k=4: 960 epochs, decays 600/720/840)."""
    return tuple(int(e) * max(int(epoch_factor), 1) for e in decay_epochs)


def step_decay_schedule(base_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int], decay_rate: float = 0.1):
    """lr as a function of the optimiser step: constant inside an epoch, x ``decay_rate`` after each milestone.

    Update ``count`` belongs to the 1-based epoch ``count // steps_per_epoch + 1``, which is past milestone m from
    count ``m * steps_per_epoch`` on: the boundaries of ``optax.piecewise_constant_schedule``."""
    boundaries = {int(m) * int(steps_per_epoch): float(decay_rate) for m in sorted(decay_epochs)}
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
    tx: optax.GradientTransformation
    schedule: Callable


def make_recipe(config, num_train: int, num_devices: int, model_name: str) -> Recipe:
    """Epochs (x epoch_factor), the epoch plan, the lr rule and the SGD optimiser with its step decay."""
    epochs = int(config.epochs) * max(int(config.epoch_factor), 1)
    plan = epochs_lib.make_plan(num_train, int(config.batch_size), num_devices, config.last_batch)
    chunk = epochs_lib.chunk_length(plan.full_steps, parallel.steps_per_dispatch(config.steps_per_dispatch))
    base_lr = default_lr(model_name, config.optim.lr)
    decay_epochs = scaled_decay_epochs(config.optim.decay_epochs, config.epoch_factor)
    tx, schedule = make_optimizer(base_lr, plan.steps_per_epoch, decay_epochs, config.optim.decay_rate,
                                  config.optim.momentum, config.optim.weight_decay)
    return Recipe(epochs, plan, chunk, base_lr, decay_epochs, tx, schedule)

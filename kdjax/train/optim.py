"""The paper's optimiser recipe (SPEC section 4): SGD, momentum 0.9, coupled weight decay 5e-4 on every parameter,
per-epoch step decay x0.1 at epochs 150/180/210 (1-based epochs, strict ``epoch > milestone``)."""
from typing import Optional, Sequence

import jax.numpy as jnp
import optax

# The original forces lr 0.01 for these students/teachers (option.py); kdjax uses it only when optim.lr is None.
LOW_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def default_lr(model_name: str, lr: Optional[float]) -> float:
    """An explicit lr wins (a deliberate deviation: the original overrides even the command line)."""
    if lr is not None:
        return float(lr)
    return 0.01 if model_name in LOW_LR_MODELS else 0.05


def scaled_decay_epochs(decay_epochs: Sequence[int], epoch_factor: int) -> tuple:
    """``--epoch_factor k`` scales the milestones as it scales the epochs (k=4: 960 epochs, decays 600/720/840)."""
    return tuple(int(e) * max(int(epoch_factor), 1) for e in decay_epochs)


def step_decay_schedule(base_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int], decay_rate: float = 0.1):
    """lr as a function of the optimiser step: constant inside an epoch, x decay_rate after each milestone."""
    milestones = jnp.asarray(sorted(decay_epochs) or [10**9], jnp.int32)
    use = len(decay_epochs) > 0

    def schedule(count):
        epoch = count // steps_per_epoch + 1  # 1-based epoch of this update
        passed = jnp.sum(epoch > milestones) if use else 0
        return base_lr * decay_rate ** passed

    return schedule


def make_optimizer(base_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int], decay_rate: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 5e-4):
    """PyTorch SGD semantics: d = g + wd * p; buf = momentum * buf + d (buf starts at d); p -= lr * buf."""
    schedule = step_decay_schedule(base_lr, steps_per_epoch, decay_epochs, decay_rate)
    tx = optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(schedule, momentum=momentum if momentum else None, nesterov=False))
    return tx, schedule

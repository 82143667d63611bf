"""CTKD: curriculum temperature for KD (Li et al., AAAI 2023; zhengli97/CTKD), a plug-in of the KD step's logit
block (``--config.ctkd.mode=global``).

The temperature of the logit terms is learned: T = t_start + t_end * sigmoid(grl(theta, lambda)), with theta a
trainable scalar (``models/temp_global.py`` ``Global_T``, initialised to 1) that the student's SGD updates beside the
student, and ``grl`` the identity whose backward multiplies the gradient by lambda (``GradientReversalFunction``).
lambda follows a cosine curriculum over the epochs from ``lambda_max`` (0) to ``lambda_min`` (-1) in ``loops`` (10)
epochs (``train_student.py`` ``CosineDecay``), so it is negative: theta ascends the distillation loss (the
temperature makes the task harder), more and more as training goes on, while the student descends it.

Why a plug-in block (``ctkd.*``) rather than a distiller or a ``distill.*`` option: CTKD changes the temperature of
the logit block, which belongs to the step (as ``loss.logit_stand`` and ``loss.sample_weights`` do), not to one
method. It applies to ``kd`` (and so to the KD block beside any feature distiller, as the original's
``criterion_div``) and to ``dkd`` (whose loss then runs at the learned T, as the original passes ``temp`` to its
DKD); a distiller option would have to be declared on every class and refused on most. Its options are declared on
``CurriculumTemperature`` with their help, and the config block and the ``--help`` lines derive from it.

The instance-wise variant (a temperature per sample from a small network) is not in the official repository (its
README points to a drive archive for it), so only the global temperature is built.
"""
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from kdjax.distillers.registry import option

# ctkd.mode values: 'none' (the fixed loss.temperature) or 'global' (one learned temperature).
MODES = ("none", "global")
# The trainable scalar's initial value (models/temp_global.py: nn.Parameter(torch.ones(1))).
THETA_INIT = 1.0
# The distillers whose logit terms read the step's temperature: kd's KL (beside a feature distiller too) and dkd.
LOGIT_DISTILLERS = ("dkd",)


@dataclasses.dataclass(frozen=True)
class CurriculumTemperature:
    """The learned global temperature and its curriculum: the official CIFAR-100 script's values
    (scripts/run_cifar_distill.sh: --t_start 1 --t_end 20 --cosine_decay 1 --decay_max 0 --decay_min -1
    --decay_loops 10)."""

    mode: str = option("none", "curriculum temperature (CTKD): global learns one temperature by gradient reversal")
    t_start: float = option(1.0, "lowest temperature: T = t_start + t_end * sigmoid(theta)")
    t_end: float = option(20.0, "temperature range above t_start")
    loops: int = option(10, "epochs over which the reversal weight lambda ramps from lambda_max to lambda_min")
    lambda_max: float = option(0.0, "reversal weight at epoch 0 (the cosine curriculum's start)")
    lambda_min: float = option(-1.0, "reversal weight from epoch `loops` on (negative: the temperature ascends)")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"ctkd.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if int(self.loops) < 1:
            raise ValueError(f"ctkd.loops must be >= 1 epoch, got {self.loops}")
        if not float(self.t_end) > 0 or not float(self.t_start) > 0:
            raise ValueError(f"ctkd.t_start and ctkd.t_end must be > 0, got {self.t_start} and {self.t_end}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def reversal_weight(self, epoch):
        """lambda at the 1-based ``epoch`` (the official loop calls ``get_value(epoch)`` for epochs 1..E)."""
        return curriculum_lambda(epoch, int(self.loops), float(self.lambda_max), float(self.lambda_min))

    def temperature(self, theta, epoch):
        """T for the step's epoch: t_start + t_end * sigmoid(grl(theta, lambda(epoch)))."""
        return learned_temperature(theta, self.reversal_weight(epoch), float(self.t_start), float(self.t_end))


def curriculum_lambda(epoch, loops: int = 10, lambda_max: float = 0.0, lambda_min: float = -1.0):
    """The official ``CosineDecay.get_value``: i = clip(epoch, 0, loops); (cos(i * pi / loops) + 1) / 2 scaled from
    [0, 1] to [lambda_min, lambda_max]."""
    i = jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, float(loops))
    value = (jnp.cos(i * math.pi / loops) + 1.0) * 0.5
    return value * (lambda_max - lambda_min) + lambda_min


@jax.custom_vjp
def scale_gradient(x, weight):
    """The identity, whose gradient is multiplied by ``weight`` (the official GradientReversalFunction: the
    reversal comes from the curriculum's negative lambda). ``weight`` gets no gradient."""
    del weight
    return x


def _scale_fwd(x, weight):
    return x, weight


def _scale_bwd(weight, g):
    return weight * g, jnp.zeros_like(weight)


scale_gradient.defvjp(_scale_fwd, _scale_bwd)


def learned_temperature(theta, weight, t_start: float = 1.0, t_end: float = 20.0):
    """t_start + t_end * sigmoid(theta) with theta's gradient multiplied by ``weight`` (lambda)."""
    theta = jnp.asarray(theta, jnp.float32)
    return t_start + t_end * jax.nn.sigmoid(scale_gradient(theta, jnp.asarray(weight, jnp.float32)))


def init_params():
    """The trainable temperature parameter (a scalar pytree the student's optimiser updates)."""
    return {"theta": jnp.asarray(THETA_INIT, jnp.float32)}


# ---------------------------------------------------------------------------------------------- config block


def config_block() -> ml_collections.ConfigDict:
    """The ``ctkd`` group of the distill config: every field of ``CurriculumTemperature`` with its default."""
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(CurriculumTemperature)})


def option_help(name: str) -> str:
    return next((f.metadata["help"] for f in dataclasses.fields(CurriculumTemperature) if f.name == name), "")


def from_config(group) -> Optional[CurriculumTemperature]:
    """The run's ``CurriculumTemperature`` from the ``ctkd`` group, or None when it is absent or mode is none."""
    if group is None:
        return None
    values = {k: v for k, v in group.to_dict().items() if v is not None}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(CurriculumTemperature)})
    if unknown:
        raise ValueError(f"unknown ctkd option(s) {', '.join(unknown)}")
    made = CurriculumTemperature(**values)
    return made if made.enabled else None


def check_ctkd(ctkd: Optional[CurriculumTemperature], distiller, logit_stand: bool, sample_weights: str) -> None:
    """One line for a combination the official code does not have: a logit distiller other than dkd (its loss
    does not read the step's temperature), logit standardisation (its own base temperature) or sample weights."""
    if ctkd is None:
        return
    name = "kd" if distiller is None else distiller.name
    if distiller is not None and distiller.replaces_kl and name not in LOGIT_DISTILLERS:
        raise ValueError(f"ctkd.mode={ctkd.mode} learns the temperature of kd's KL (beside any feature distiller) "
                         f"or of dkd, not of distiller={name}: unset ctkd.mode or use distiller=kd or dkd")
    if logit_stand:
        raise ValueError("ctkd.mode learns the temperature that loss.logit_stand replaces by its base temperature: "
                         "unset one of them")
    if sample_weights not in (None, "none"):
        raise ValueError("ctkd.mode with loss.sample_weights is not built: unset one of them")

"""The distiller interface and the helpers every distiller shares.

A distiller is one of two kinds, told apart by the class attribute ``replaces_kl``:

* a **feature distiller** (``replaces_kl = False``: crd, hint, at, ...) adds ``beta * L(features_s, features_t,
  state)`` to the KD step, computed on the original (un-augmented) batch, beside KD;
* a **logit distiller** (``replaces_kl = True``: dkd, dist) replaces KD's ``KL_T`` on both x and x' by its
  ``logit_loss``, keeping the ``lw_mix`` weights of the two terms and the CE term.

``kd`` is this base class itself: its ``logit_loss`` is KD's ``KL_T`` and it adds no feature term. A distiller is a
small frozen dataclass (hashable, so it can be closed over by a jitted step) with

* ``init(key, feats_s, feats_t, num_train=None, train_labels=None) -> (params, state)``: ``params`` are the
  trainable heads (a plain pytree, ``{}`` when none), optimised and checkpointed beside the student;
  ``state`` is non-trainable (CRD's memory banks, BatchNorm statistics of a head), ``{}`` when none.
* ``loss(params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True)
  -> (loss, new_state)``: a float32 scalar, and the state to carry to the next step.
* ``logit_loss(logits_s, logits_t, labels, epoch, temperature) -> loss``: the term of each logit pair (x and x');
  ``epoch`` is the 1-based epoch of the step (DKD's warm-up reads it). ``logit_loss_aug`` is the term on x' (the
  same unless overridden: MLKD's strong view).
* ``default_weights(aug, logit_stand=False) -> {'gamma', 'alpha', 'beta'}``: the weights of CE, of the logit block
  (KL, or the logit distiller's loss) and of the feature term.

The two-stage methods of the original (``ab``, ``ft``, ``fsp``; ``init_stage = True``) first train an *init stage*
(the original's helper/pretrain.py) on ``init_stage_loss(heads, feats_s, feats_t)``: heads from
``init_stage_heads`` (AB's connectors, FT's paraphraser; none for FSP) and, when ``init_trains_student``, the
student's feature modules; ``init_stage_lr`` gives its learning rate. Their KD stage is then ``init(...,
init_heads=<the trained heads>)`` and ``loss`` as for any feature distiller (FT: the factor-transfer term), or plain
KD when ``stage_term`` is False (AB and FSP: the original's ``loss_kd = 0``). ``preact`` asks the models for their
pre-activation features in both stages (AB). ``check_shapes(feats_s, feats_t)`` fails in one line when a distiller
cannot pair two models' features (a no-op unless overridden).

Feature lists are what ``model.apply(..., features=True)`` returns: ``[f0, ..., f_last]`` with NHWC maps and
``f[-1]`` the pooled ``[B, D]`` vector. The teacher's features are constants inside every loss
(``stop_gradient``), so a gradient can only reach the student and the heads.
"""
import dataclasses
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.distillers.registry import option, register

# Schemes under which the KL block has nothing to add beyond the distiller: the original's setting (alpha 0).
IDENTITY_AUGS = (None, "", "none", "identity")

# Logit standardisation (Sun et al., CVPR 2024), the official tools/train.py defaults: --kd-weight 9 (the weight of
# the logit block; DKD multiplies its alpha and beta by it, the same as weighting its whole loss by 9) and
# --base-temp 2 (the temperature of the standardised terms only: loss.temperature keeps scoring CutMixPick 'kld').
LS_WEIGHT = 9.0
LS_TEMPERATURE = 2.0
# The losses the official code standardises (its KD and DKD; its MLKD is not checked against kdjax's).
LOGIT_STAND_DISTILLERS = ("kd", "dkd")


@register
@dataclasses.dataclass(frozen=True)
class Distiller:
    """Base class; the ``kd`` distiller is this class itself (no extra loss)."""

    name: ClassVar[str] = "kd"
    # True when ``loss`` needs the dataset indices of the batch rows and a key (CRD's memory and negatives).
    needs_indices: ClassVar[bool] = False
    # False only for ``kd`` and the logit distillers: the step can then skip asking the models for their features.
    uses_features: ClassVar[bool] = False
    # True for a logit distiller: ``logit_loss`` takes the place of KD's KL_T on x and x' and there is no feature
    # term; False for ``kd`` (its ``logit_loss`` is KL_T) and for the feature distillers, which keep KD beside them.
    replaces_kl: ClassVar[bool] = False
    # True when ``per_sample_logit_loss`` gives the per-sample terms whose mean is ``logit_loss`` (kd's KL_T, dkd),
    # which ``loss.sample_weights`` weights; False for a loss over the batch as a whole (DIST's correlations).
    per_sample: ClassVar[bool] = True
    # Two-stage methods (ab, ft, fsp): an init stage trained before the KD stage.
    init_stage: ClassVar[bool] = False
    # The init stage also trains the student's feature modules (ab, fsp), not only the heads.
    init_trains_student: ClassVar[bool] = False
    # Features asked with preact=True, in both stages (ab).
    preact: ClassVar[bool] = False
    # False: no feature term in the KD stage (ab, fsp: the original's loss_kd = 0), whose program is plain KD's.
    stage_term: ClassVar[bool] = True
    # True when the student's CE on x' (the scheme's mixed labels) joins the loss with CE's weight gamma (MLKD: the
    # original's cross-entropy on its strong view beside the weak one's).
    ce_on_aug: ClassVar[bool] = False
    # The KD step asks the teacher for its pre-activation features (reviewkd's targets); the student's stay as is.
    teacher_preact: ClassVar[bool] = False
    # The feature term's weight follows the epoch (reviewkd's warm-up): the step multiplies the term by
    # ``term_scale(epoch)`` with its 1-based epoch.
    term_follows_epoch: ClassVar[bool] = False

    beta: float = 0.0
    # The "+KD" variant of the original (e.g. CRD+KD: -a 1): the KL block keeps weight 1 at identity.
    with_kd: bool = option(False, "the '+KD' variant (e.g. CRD+KD): alpha 1 under identity")

    @property
    def needs_teacher(self) -> bool:
        """Every method but plain ``kd`` distils something of a teacher (``kd`` with ``teacher=none`` is CE)."""
        return self.name != "kd"

    def default_weights(self, aug: str | None = None, logit_stand: bool = False) -> Dict[str, float]:
        """The weights of ``gamma*CE + alpha*KL-block + beta*L`` for a run with scheme ``aug``.

        The original's feature-distiller runs use gamma 1, alpha 0 (1 for the "+KD" variants) and the method's
        beta. With alpha 0 a DA scheme would do nothing, since the scheme only enters through the KL block
        (docs/fidelity.md, "Distillers"), so under any scheme other than identity alpha becomes 0.9 and gamma 0.1,
        the paper's KD weights. Plain ``kd`` always uses the paper's 0.1 / 0.9, and with logit standardisation the LS code's
        0.1 / 9 (``LS_WEIGHT``).
        """
        if self.name == "kd":
            return dict(gamma=0.1, alpha=LS_WEIGHT if logit_stand else 0.9, beta=0.0)
        if aug not in IDENTITY_AUGS:
            return dict(gamma=0.1, alpha=0.9, beta=float(self.beta))
        return dict(gamma=1.0, alpha=1.0 if self.with_kd else 0.0, beta=float(self.beta))

    def logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        """The term of one logit pair (x or x'): KD's batch-mean KL_T times T² (``labels`` and ``epoch`` unused)."""
        del labels, epoch
        return losses.kd_kl(logits_s, logits_t, temperature)

    def logit_loss_aug(self, logits_s, logits_t, labels, epoch, temperature: float):
        """The term of the pair on x': ``logit_loss`` unless a method treats its two views apart (MLKD's weak x
        and strong x')."""
        return self.logit_loss(logits_s, logits_t, labels, epoch, temperature)

    def per_sample_logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        """``[B]`` terms whose batch mean is ``logit_loss``: KD's per-sample KL_T times T²."""
        del labels, epoch
        return losses.kd_kl_per_sample(logits_s, logits_t, temperature) * (temperature * temperature)

    def init(self, key, feats_s: Sequence[Any], feats_t: Sequence[Any], num_train: int | None = None,
             train_labels=None) -> Tuple[Any, Any]:
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None,
             train: bool = True):
        return jnp.zeros((), jnp.float32), state

    def term_scale(self, epoch):
        """The factor on the feature term at the step's 1-based ``epoch`` (read when ``term_follows_epoch``)."""
        del epoch
        return 1.0

    def check_shapes(self, feats_s, feats_t) -> None:
        """Raise a one-line ``ValueError`` naming the fix when the two feature lists (arrays or
        ``ShapeDtypeStruct``s) cannot be paired by this distiller; the default accepts anything."""
        del feats_s, feats_t

    # -- the init stage of the two-stage methods (``init_stage = True``) --

    def init_stage_heads(self, key, feats_s, feats_t):
        """The params pytree of the heads the init stage trains (``{}`` when none); the feature lists may be
        ``ShapeDtypeStruct``s, and ``feats_s`` is None when the stage does not run the student."""
        raise ValueError(f"distiller {self.name!r} has no init stage")

    def init_stage_loss(self, heads, feats_s, feats_t):
        """The float32 scalar the init stage minimises over ``heads`` (and the student's feature modules when
        ``init_trains_student``); ``feats_s`` is None when the stage does not run the student."""
        raise ValueError(f"distiller {self.name!r} has no init stage")

    def init_stage_lr(self, student_name: str, student_lr: float) -> float:
        """The init stage's (constant) learning rate: the student's, unless a subclass has a rule or a field
        ``init_lr`` that is not None overrides it."""
        del student_name
        init_lr: Optional[float] = getattr(self, "init_lr", None)
        return float(student_lr if init_lr is None else init_lr)


def resolve_weights(distiller: Distiller, aug: str | None = None, gamma=None, alpha=None, beta=None,
                    logit_stand: bool = False):
    """``distiller.default_weights(aug, logit_stand)`` with every weight that is not None replaced (config
    overrides)."""
    weights = distiller.default_weights(aug, logit_stand)
    for name, value in (("gamma", gamma), ("alpha", alpha), ("beta", beta)):
        if value is not None:
            weights[name] = float(value)
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Feature helpers


def student_features(feats):
    """float32 copies of the student's features (heads and losses run in float32 whatever the model's dtype)."""
    return [jnp.asarray(f).astype(jnp.float32) for f in feats]


def teacher_features(feats):
    """float32, gradient-free copies of the teacher's features: the teacher is data, never differentiated."""
    return [jax.lax.stop_gradient(jnp.asarray(f).astype(jnp.float32)) for f in feats]


def apply_bn_head(module, params, state, name: str, x, train: bool):
    """A head with BatchNorm (FitNet's ConvReg, FT's translator): its output on ``x``, and ``state`` with the head's
    statistics, ``state['batch_stats'][name]``, updated when ``train`` (its parameters are ``params[name]``)."""
    variables = {"params": params[name], "batch_stats": state["batch_stats"][name]}
    if not train:
        return module.apply(variables, x, train=False), state
    out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, {**state, "batch_stats": {**state["batch_stats"], name: updates["batch_stats"]}}


def shape_of(f) -> Tuple[int, ...]:
    """Shape of an array or a ShapeDtypeStruct (``init`` accepts either)."""
    return tuple(int(d) for d in f.shape)


def check_feature_list(feats, who: str, minimum: int) -> None:
    if not isinstance(feats, (list, tuple)) or len(feats) < minimum:
        raise ValueError(f"{who} features must be the list from model.apply(..., features=True) with at least "
                         f"{minimum} entries; got {type(feats).__name__} of length "
                         f"{len(feats) if isinstance(feats, (list, tuple)) else 'n/a'}")


def check_map(shape, who: str) -> None:
    if len(shape) != 4:
        raise ValueError(f"{who} must be an NHWC feature map, got shape {shape}; pass the list from "
                         "model.apply(..., features=True)")


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """PyTorch's ``F.normalize``: x / max(||x||, eps).

    The norm is taken as sqrt(max(sum x², eps²)) (same value) so that an all-zero row, such as the diagonal of
    RKD's pairwise differences, has a zero gradient instead of the nan of d||x|| at x = 0.
    """
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] averaging matrix of PyTorch's adaptive_avg_pool along one axis (bins floor/ceil of i*in/out)."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        lo = (i * size_in) // size_out
        hi = -((-(i + 1) * size_in) // size_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x, out_hw: Tuple[int, int]):
    """``F.adaptive_avg_pool2d`` on an NHWC map, as two small matmuls with static averaging matrices."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(out_hw):
        return x
    ph = jnp.asarray(_adaptive_pool_matrix(h, out_hw[0]))
    pw = jnp.asarray(_adaptive_pool_matrix(w, out_hw[1]))
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


def match_spatial(f_s, f_t):
    """The original's size matching for AT and VID: the map with the larger height is adaptively average-pooled
    to the other's (H, H)-square size (both are square in the zoo)."""
    hs, ht = f_s.shape[1], f_t.shape[1]
    if hs > ht:
        f_s = adaptive_avg_pool(f_s, (ht, ht))
    elif hs < ht:
        f_t = adaptive_avg_pool(f_t, (hs, hs))
    return f_s, f_t

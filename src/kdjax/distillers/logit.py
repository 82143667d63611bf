"""Logit distillers beyond plain KD: DKD, DIST, NKD, WTTM and logit standardisation (LS), as pure loss functions.

Each takes ``[B, C]`` student and teacher logits, computes in float32 whatever their dtype, and treats the teacher
as a constant (``stop_gradient``). They are checked value-for-value and gradient-for-gradient against the official
PyTorch code in tests/test_distiller_fixtures.py (fixtures written by tests/fixtures/make_distiller_fixtures.py).

* DKD (Zhao et al., CVPR 2022; megvii-research/mdistiller): ``alpha * TCKD + beta * NCKD``. TCKD is the KL between
  the binary (target, all other classes) distributions, NCKD the KL between the distributions over the non-target
  classes alone; both batch-summed, divided by B and multiplied by T². The official trainer also ramps the loss in
  linearly over the first ``warmup`` epochs: ``dkd_warmup(epoch)``.
* DIST (Huang et al., NeurIPS 2022; hunto/DIST_KD): one minus the mean Pearson correlation of the softened
  probabilities, row-wise (inter-class) and column-wise (intra-class), each times tau².
* LS (Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD): the KD or DKD loss on per-row z-scored
  logits, at a "base temperature" (2 on CIFAR-100) and with a larger loss weight (9).

* NKD (Yang et al., ICCV 2023; yzd-v/cls_KD, mmcls/models/dis_losses/nkd.py): the teacher's target probability
  as the weight of the student's target log-probability, ``-mean(p_t[y] log p_s[y])`` (temperature 1), plus
  ``gamma * temp²`` times the cross-entropy between the teacher's and the student's distributions over the
  non-target classes alone at temperature ``temp``.
* WTTM (Zheng and Yang, ICLR 2024; zkxufo/TTM, distiller_zoo/wttm.py): transformed teacher matching, KL(p̃_t ||
  p_s) with the teacher's probabilities raised to the power ``l`` and renormalised (p̃_t = softmax(l * z_t)) and the
  student at temperature 1, each row weighted by the teacher's power sum ``sum_c p_t^l`` (larger for a smoother
  teacher); batch mean.
* MLKD (Jin et al., CVPR 2023; Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py): on a
  weak and a strong view of each image, KD at five temperatures (the step's T and 3, 5, 2, 6) plus the class-level
  (C x C) and batch-level (B x B) Gram matrices of the softened probabilities matched in squared error, as the
  official code computes them (``mlkd_weak_loss`` / ``mlkd_strong_loss``, docs/fidelity.md "MLKD").

The ``*_CIFAR100`` dicts give the weights the official repositories train CIFAR-100 students with.

``DKD`` and ``DIST`` are the logit distillers of the KD step (``replaces_kl``): their ``logit_loss`` takes the place
of KL_T on x and on x'. Logit standardisation is not a distiller but the step's switch ``KDWeights.logit_stand``
(``loss.logit_stand``), which z-scores both logits of the kd or dkd terms and evaluates them at the base
temperature; ``standardize`` is its one implementation.
"""
import dataclasses
from typing import ClassVar, Dict

import jax
import jax.numpy as jnp

from kdjax.distillers.interface import LS_TEMPERATURE, LS_WEIGHT, Distiller
from kdjax.losses import kd_kl
from kdjax.distillers.registry import option, register

# The official CIFAR-100 recipes (see the fixture script and the report for the file each number comes from).
# DKD: mdistiller/engine/cfg.py (CE 1, alpha 1, beta 8, T 4, warm-up 20 epochs), the default; the per-pair configs
# that lower beta (2 or 6) are the table kdjax/configs/recipes.py, which a distill run applies to its pair.
DKD_CIFAR100 = dict(ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20)
# DIST: configs/strategies/distill/dist_cifar.yaml (ori_loss_weight 1, kd_loss_weight 2, kd 'dist_t4').
DIST_CIFAR100 = dict(ce_weight=1.0, kd_weight=2.0, beta=1.0, gamma=1.0, tau=4.0)
# LS: tools/train.py --logit-stand --base-temp 2 --kd-weight 9 (KD keeps CE weight 0.1; DKD multiplies both its
# alpha and beta by the kd weight).
LS_KD_CIFAR100 = dict(ce_weight=0.1, kd_weight=LS_WEIGHT, temperature=LS_TEMPERATURE)
LS_DKD_CIFAR100 = dict(ce_weight=1.0, alpha=LS_WEIGHT * 1.0, beta=LS_WEIGHT * 8.0, temperature=LS_TEMPERATURE,
                       warmup_epochs=20)

# NKD: cls_KD configs/distillers/cifar100/res34_distill_res18_cifar.py (NKDLoss temp 3.0, gamma 3.5; its loss
# and the student's CE both with weight 1); the ImageNet configs use temp 1, gamma 1.5.
NKD_CIFAR100 = dict(ce_weight=1.0, kd_weight=1.0, temperature=3.0, gamma=3.5)
# WTTM: the TTM repository's README example of WTTM (--add wttm --ttm_l 0.2 -a 4, with -r 1); the paper lists its
# per-pair T and beta in its appendix A.4, which the repository does not carry.
WTTM_CIFAR100 = dict(ce_weight=1.0, kd_weight=4.0, power=0.2)
# MLKD: its CIFAR-100 configs (configs/cifar100/ours/*.yaml) set no KD block, so mdistiller/engine/cfg.py's KD
# defaults apply (TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9); KD_ours.py adds the fixed temperatures 3, 5, 2, 6.
MLKD_CIFAR100 = dict(ce_weight=0.1, kd_weight=0.9, temperature=4.0)
MLKD_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)

# NCKD removes the target class by lowering its logit this much below the others: its softmax weight underflows to
# exactly 0 in float32, while every term stays finite (a -inf logit would turn the gradient into nan).
_TARGET_SHIFT = 1000.0


def _student(x):
    return jnp.asarray(x).astype(jnp.float32)


def _teacher(x):
    return jax.lax.stop_gradient(jnp.asarray(x).astype(jnp.float32))


def standardize(logits, eps: float = 1e-7):
    """Per-row z-score of ``[B, C]`` logits: (z - mean) / (std + eps), with the unbiased (C - 1) standard
    deviation and eps added to the deviation, as the LS repository's ``normalize``."""
    z = jnp.asarray(logits).astype(jnp.float32)
    mean = jnp.mean(z, axis=-1, keepdims=True)
    std = jnp.std(z, axis=-1, keepdims=True, ddof=1)
    return (z - mean) / (std + eps)


def _kl_rows(log_p, log_q):
    """sum_c p (log p - log q) per row, with p = exp(log_p); rows where p underflows to 0 contribute 0."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def dkd_loss(logits_s, logits_t, labels, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             logit_stand: bool = False):
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (batch mean, times T²), without the warm-up factor.

    ``labels`` are integer ``[B]`` class ids. ``logit_stand=True`` standardises both logits first (LS-DKD; pair
    it with the LS weights, ``LS_DKD_CIFAR100``).
    """
    return jnp.mean(dkd_loss_per_sample(logits_s, logits_t, labels, alpha, beta, temperature, logit_stand))


def dkd_loss_per_sample(logits_s, logits_t, labels, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                        logit_stand: bool = False):
    """``dkd_loss``'s ``[B]`` per-sample terms (times T²), whose batch mean it is (EA-KD weights these)."""
    s, t = _student(logits_s), _teacher(logits_t)
    if logit_stand:
        s, t = standardize(s), standardize(t)
    c = s.shape[1]
    target = jax.nn.one_hot(jnp.asarray(labels).astype(jnp.int32), c, dtype=jnp.bool_)
    zs, zt = s / temperature, t / temperature

    def binary(z):
        """log of (p_target, p_rest) from logits, the rest as a log-sum-exp over the non-target classes."""
        log_p = jax.nn.log_softmax(z, axis=-1)
        log_target = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
        log_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_p), axis=-1)
        return jnp.stack([log_target, log_rest], axis=-1)

    tckd = _kl_rows(binary(zt), binary(zs))

    def non_target(z):
        return jax.nn.log_softmax(z - _TARGET_SHIFT * target, axis=-1)

    nckd = _kl_rows(non_target(zt), non_target(zs))
    return (alpha * tckd + beta * nckd) * (temperature * temperature)


def dkd_warmup(epoch, warmup_epochs: int = 20):
    """The official trainer's factor on the DKD loss: min(epoch / warmup, 1), epochs counted from 1."""
    return jnp.minimum(jnp.asarray(epoch, jnp.float32) / float(warmup_epochs), 1.0)


def _pearson_rows(a, b, eps: float = 1e-8):
    """Per-row Pearson correlation of ``[N, M]`` arrays, eps added to the product of the centred norms."""
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(a * a, axis=1)) * jnp.sqrt(jnp.sum(b * b, axis=1))
    return jnp.sum(a * b, axis=1) / (norm + eps)


def dist_loss(logits_s, logits_t, beta: float = 1.0, gamma: float = 1.0, tau: float = 4.0):
    """DIST: tau² * (beta * inter + gamma * intra), inter = 1 - mean row-wise Pearson correlation of
    softmax(z / tau) over the classes, intra = the same column-wise, over the batch.

    The default tau = 4 is the CIFAR-100 recipe (``kd: dist_t4``); the loss class's own default, used on
    ImageNet, is tau = 1.
    """
    ps = jax.nn.softmax(_student(logits_s) / tau, axis=-1)
    pt = jax.nn.softmax(_teacher(logits_t) / tau, axis=-1)
    inter = 1.0 - jnp.mean(_pearson_rows(ps, pt))
    intra = 1.0 - jnp.mean(_pearson_rows(ps.T, pt.T))
    return (tau * tau) * (beta * inter + gamma * intra)


def ls_kd_loss(logits_s, logits_t, temperature: float = 2.0):
    """LS-KD: batch-mean KL(softmax(std(t)/T) || softmax(std(s)/T)) times T², on standardised logits."""
    return kd_kl(standardize(logits_s), standardize(_teacher(logits_t)), temperature)


def nkd_loss(logits_s, logits_t, labels, temperature: float = 1.0, gamma: float = 1.5):
    """NKD: ``-mean_b(p_t[y] log p_s[y]) - gamma * T² * mean_b(sum_{c != y} p̂_t log p̂_s)``, the first term at
    temperature 1, the second over the non-target classes (renormalised) at temperature ``T``.

    ``labels`` are integer ``[B]`` class ids. The target column is removed as in DKD's NCKD: shifted far below the
    others, its softmax weight is exactly 0 in float32."""
    s, t = _student(logits_s), _teacher(logits_t)
    b, c = s.shape
    target = jax.nn.one_hot(jnp.asarray(labels).astype(jnp.int32), c, dtype=jnp.bool_)
    log_ps = jax.nn.log_softmax(s, axis=-1)
    pt = jax.nn.softmax(t, axis=-1)
    target_term = -jnp.mean(jnp.sum(jnp.where(target, pt * log_ps, 0.0), axis=-1))

    def non_target(z):
        return jax.nn.log_softmax(z / temperature - _TARGET_SHIFT * target, axis=-1)

    log_qs, log_qt = non_target(s), non_target(t)
    cross = jnp.mean(jnp.sum(jnp.exp(log_qt) * log_qs, axis=-1))
    return target_term - gamma * temperature * temperature * cross


def wttm_loss(logits_s, logits_t, power: float = 0.2):
    """WTTM: ``mean_b(U_b * KL(p̃_t || p_s))`` with p̃_t = p_t^l / U_b = softmax(l * z_t), U_b = sum_c p_t^l the
    teacher's power sum (the sample-adaptive weight) and p_s = softmax(z_s) at temperature 1."""
    s, t = _student(logits_s), _teacher(logits_t)
    log_pt = jax.nn.log_softmax(t, axis=-1)
    log_weight = jax.nn.logsumexp(power * log_pt, axis=-1)  # log U_b
    log_target = power * log_pt - log_weight[:, None]
    kl = _kl_rows(log_target, jax.nn.log_softmax(s, axis=-1))
    return jnp.mean(jnp.exp(log_weight) * kl)


def _gram_gap(ps, pt, over_classes: bool):
    """MLKD's ``cc_loss`` (``over_classes``: the C x C matrices p^T p, the sum divided by C) or ``bc_loss`` (the B
    x B matrices p p^T, divided by B): the summed squared difference of the teacher's and the student's Gram
    matrices of the softened probabilities."""
    def gram(p):
        a, b = (p.T, p) if over_classes else (p, p.T)
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum((gram(pt) - gram(ps)) ** 2) / ps.shape[1 if over_classes else 0]


def _below_median_fraction(values):
    """The fraction of ``values`` at or below their median (NumPy's linearly interpolated 50th percentile), a
    constant: what the official ``(loss * mask).mean()`` of a scalar loss and a boolean mask multiplies by."""
    values = jax.lax.stop_gradient(values)
    return jnp.mean((values <= jnp.percentile(values, 50.0)).astype(jnp.float32))


def mlkd_weak_loss(logits_s, logits_t, temperature: float = 4.0):
    """MLKD's terms of the weak view (x), as KD_ours.py sums them (kd_loss_weight not applied):

    ``f_i * sum_T KD_T + KD_2 + KD_6 + f_c * sum_T CC_T + f_i * sum_T BC_T`` over T in (temperature, 3, 5, 2, 6),
    with f_i the fraction of the batch whose teacher confidence max_c p_t is at or below its median and f_c the
    fraction of classes whose summed teacher probability is (the official masks multiply batch-mean scalars, so
    each mask acts as this one number); KD_2 and KD_6 are the weak-view terms of the official ``loss_kd_strong``."""
    s, t = _student(logits_s), _teacher(logits_t)
    p_t = jax.nn.softmax(t, axis=-1)
    f_instance = _below_median_fraction(jnp.max(p_t, axis=-1))
    f_class = _below_median_fraction(jnp.sum(p_t, axis=0))
    total = kd_kl(s, t, 2.0) + kd_kl(s, t, 6.0)
    for tau in (float(temperature),) + MLKD_TEMPERATURES:
        ps, pt = jax.nn.softmax(s / tau, axis=-1), jax.nn.softmax(t / tau, axis=-1)
        total = total + f_instance * (kd_kl(s, t, tau) + _gram_gap(ps, pt, over_classes=False))
        total = total + f_class * _gram_gap(ps, pt, over_classes=True)
    return total


def mlkd_strong_loss(logits_s, logits_t, temperature: float = 4.0):
    """MLKD's terms of the strong view (x'): ``KD_T + KD_3 + KD_5`` (T = ``temperature``), unmasked. The official
    ``loss_cc_strong`` and ``loss_bc_strong`` are computed but not returned, so they train nothing."""
    s, t = _student(logits_s), _teacher(logits_t)
    return kd_kl(s, t, float(temperature)) + kd_kl(s, t, 3.0) + kd_kl(s, t, 5.0)


# ----------------------------------------------------------------------------------------------------------------
# The logit distillers of the KD step (registered by ``kdjax.distillers``)


@dataclasses.dataclass(frozen=True)
class LogitDistiller(Distiller):
    """A loss on (student, teacher) logits that replaces KD's KL_T on x and x' (``replaces_kl``); no heads, no
    state, no feature term. ``ce_weight``/``kd_weight`` are the official CIFAR-100 weights of CE and of the loss,
    the step's gamma and alpha; they do not depend on the scheme (the loss is the logit block the scheme acts on,
    so unlike a feature distiller's alpha 0 it never silences the scheme)."""

    replaces_kl: ClassVar[bool] = True
    per_sample: ClassVar[bool] = False  # unless a subclass gives its per-sample terms (dkd)
    # True when ``logit_loss`` reads the integer labels (on x' the step then derives each row's dominant label).
    uses_labels: ClassVar[bool] = False
    ce_weight: ClassVar[float] = 1.0
    kd_weight: ClassVar[float] = 1.0

    def __post_init__(self):
        if self.with_kd:
            raise ValueError(f"distiller={self.name} replaces KD's KL terms, so it has no '+KD' variant: unset "
                             "distill.with_kd")

    def default_weights(self, aug=None, logit_stand: bool = False) -> Dict[str, float]:
        del aug
        return dict(gamma=self.ce_weight, alpha=LS_WEIGHT if logit_stand else self.kd_weight, beta=0.0)


@register
@dataclasses.dataclass(frozen=True)
class DKD(LogitDistiller):
    """Decoupled KD on each logit pair: ``min(epoch / warmup, 1) * (dkd_alpha * TCKD + dkd_beta * NCKD)`` at the
    step's temperature (loss.temperature, 4 as the official T). ``dkd_alpha``/``dkd_beta`` are the paper's alpha
    and beta (named apart from the step's alpha and beta weights); ``warmup`` (epochs, 0: none) is the official
    trainer's ramp of the loss, counted from epoch 1 as its ``kwargs['epoch']``. On x' the target class of a
    mixed image is its dominant label (the largest weight of the scheme's label targets)."""

    name: ClassVar[str] = "dkd"
    uses_labels: ClassVar[bool] = True
    ce_weight: ClassVar[float] = DKD_CIFAR100["ce_weight"]
    dkd_alpha: float = option(DKD_CIFAR100["alpha"], "weight of the target-class term")
    dkd_beta: float = option(DKD_CIFAR100["beta"], "weight of the non-target-class term")
    warmup: int = option(DKD_CIFAR100["warmup_epochs"], "epochs over which its loss ramps in (0: none)")

    def __post_init__(self):
        super().__post_init__()
        if int(self.warmup) < 0:
            raise ValueError(f"distill.warmup must be >= 0 epochs, got {self.warmup}")

    per_sample: ClassVar[bool] = True

    def logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        return jnp.mean(self.per_sample_logit_loss(logits_s, logits_t, labels, epoch, temperature))

    def per_sample_logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        loss = dkd_loss_per_sample(logits_s, logits_t, labels, self.dkd_alpha, self.dkd_beta, temperature)
        return loss * dkd_warmup(epoch, int(self.warmup)) if int(self.warmup) > 0 else loss


@register
@dataclasses.dataclass(frozen=True)
class DIST(LogitDistiller):
    """DIST on each logit pair: ``tau² (dist_beta * inter + dist_gamma * intra)`` with tau the step's temperature
    (loss.temperature, 4 as the CIFAR-100 recipe's ``dist_t4``); CE 1 and loss weight 2 as its recipe."""

    name: ClassVar[str] = "dist"
    ce_weight: ClassVar[float] = DIST_CIFAR100["ce_weight"]
    kd_weight: ClassVar[float] = DIST_CIFAR100["kd_weight"]
    dist_beta: float = option(DIST_CIFAR100["beta"], "weight of the inter-class relation")
    dist_gamma: float = option(DIST_CIFAR100["gamma"], "weight of the intra-class relation")

    def logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        del labels, epoch
        return dist_loss(logits_s, logits_t, self.dist_beta, self.dist_gamma, temperature)


@register
@dataclasses.dataclass(frozen=True)
class NKD(LogitDistiller):
    """NKD on each logit pair: ``nkd_loss`` with its own temperature ``nkd_temp`` (the official CIFAR-100 config's
    3; the step's loss.temperature is not used) and ``nkd_gamma`` (3.5); CE 1 and loss weight 1. On x' the target
    class of a mixed image is its dominant label, as the official loss takes the arg-max of a soft label."""

    name: ClassVar[str] = "nkd"
    uses_labels: ClassVar[bool] = True
    ce_weight: ClassVar[float] = NKD_CIFAR100["ce_weight"]
    kd_weight: ClassVar[float] = NKD_CIFAR100["kd_weight"]
    nkd_temp: float = option(NKD_CIFAR100["temperature"], "temperature of the non-target-class term")
    nkd_gamma: float = option(NKD_CIFAR100["gamma"], "weight of the non-target-class term")

    def __post_init__(self):
        super().__post_init__()
        if not float(self.nkd_temp) > 0:
            raise ValueError(f"distill.nkd_temp must be > 0, got {self.nkd_temp}")

    def logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        del epoch, temperature
        return nkd_loss(logits_s, logits_t, labels, float(self.nkd_temp), float(self.nkd_gamma))


@register
@dataclasses.dataclass(frozen=True)
class WTTM(LogitDistiller):
    """WTTM on each logit pair: ``wttm_loss`` with the power ``ttm_l`` (the official ``--ttm_l``, 0.2 as its
    README's WTTM example; the step's loss.temperature is not used: 1 / ttm_l plays its part on the teacher side);
    CE 1 and loss weight 4 (that example's ``-a 4``)."""

    name: ClassVar[str] = "wttm"
    ce_weight: ClassVar[float] = WTTM_CIFAR100["ce_weight"]
    kd_weight: ClassVar[float] = WTTM_CIFAR100["kd_weight"]
    ttm_l: float = option(WTTM_CIFAR100["power"], "power of the teacher's probabilities, 1 / its temperature")

    def __post_init__(self):
        super().__post_init__()
        if not float(self.ttm_l) > 0:
            raise ValueError(f"distill.ttm_l must be > 0 (the power of the teacher's probabilities), got {self.ttm_l}")

    def logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        del labels, epoch, temperature
        return wttm_loss(logits_s, logits_t, float(self.ttm_l))


@register
@dataclasses.dataclass(frozen=True)
class MLKD(LogitDistiller):
    """MLKD on the two views of the KD step: x is its weak view (the base crop+flip) and x' its strong view (the
    run's scheme applied to x; RandAugment-like ``autoaugment`` or ``cutout`` come closest to the official strong
    transform). ``mlkd_weak_loss`` on (s(x), t(x)), ``mlkd_strong_loss`` on (s(x'), t(x')) at the step's
    temperature (loss.temperature, the official KD.TEMPERATURE 4), and CE on both views with CE's weight
    (``ce_on_aug``); CE 0.1 and loss weight 0.9 as mdistiller's KD defaults, which its CIFAR-100 configs keep."""

    name: ClassVar[str] = "mlkd"
    ce_on_aug: ClassVar[bool] = True
    ce_weight: ClassVar[float] = MLKD_CIFAR100["ce_weight"]
    kd_weight: ClassVar[float] = MLKD_CIFAR100["kd_weight"]

    def logit_loss(self, logits_s, logits_t, labels, epoch, temperature: float):
        del labels, epoch
        return mlkd_weak_loss(logits_s, logits_t, temperature)

    def logit_loss_aug(self, logits_s, logits_t, labels, epoch, temperature: float):
        del labels, epoch
        return mlkd_strong_loss(logits_s, logits_t, temperature)

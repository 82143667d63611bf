"""FitNet (hint), AT, SP, PKT, RKD and VID: the pure loss functions and their ``Distiller`` wrappers.

Which features each uses, and the default beta, follow the original training script (docs/fidelity.md, "Distillers"):
hint f[hint_layer=2] through ConvReg [100]; at f[1:-1] [1000]; sp f[-2] [3000]; pkt f[-1] [30000];
rkd f[-1] [1]; vid f[1:-1] through per-layer regressors [1]. Where the student and teacher lists differ in
length, the layers are paired in order and the extra ones dropped, as the original's ``zip`` does.
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kdjax.distillers import heads
from kdjax.distillers.interface import (Distiller, apply_bn_head, check_feature_list, check_map, l2_normalize,
                                        match_spatial, shape_of, student_features, teacher_features)
from kdjax.distillers.registry import option, register

# ----------------------------------------------------------------------------------------------------------------
# Pure losses (float32 inputs; the teacher side is expected to be a constant already)


def at_map(f, p: float = 2.0):
    """Attention map: L2-normalised flatten of the channel mean of f**p. ``[B, H*W]``."""
    a = jnp.mean(f ** p, axis=-1)
    return l2_normalize(a.reshape(a.shape[0], -1), axis=1)


def at_loss(f_s, f_t, p: float = 2.0):
    """One layer of AT: mean squared difference of the attention maps, after matching sizes."""
    f_s, f_t = match_spatial(f_s, f_t)
    return jnp.mean((at_map(f_s, p) - at_map(f_t, p)) ** 2)


def sp_loss(f_s, f_t):
    """SP: ||G_t - G_s||_F^2 / B^2 with G = row-normalised batch Gram matrix of the flattened features."""
    b = f_s.shape[0]
    hi = jax.lax.Precision.HIGHEST
    fs, ft = f_s.reshape(b, -1), f_t.reshape(b, -1)
    g_s = l2_normalize(jnp.dot(fs, fs.T, precision=hi), axis=1)
    g_t = l2_normalize(jnp.dot(ft, ft.T, precision=hi), axis=1)
    return jnp.sum((g_t - g_s) ** 2) / (b * b)


def pkt_loss(f_s, f_t, eps: float = 1e-7):
    """PKT: KL-like divergence between the row-normalised (cos + 1) / 2 kernels of the batch."""
    hi = jax.lax.Precision.HIGHEST

    def kernel(f):
        f = f.reshape(f.shape[0], -1)
        f = f / (jnp.sqrt(jnp.sum(f * f, axis=1, keepdims=True)) + eps)
        f = jnp.where(jnp.isnan(f), 0.0, f)  # the original zeroes NaNs (an all-zero row has norm 0 + eps)
        k = (jnp.dot(f, f.T, precision=hi) + 1.0) / 2.0
        return k / jnp.sum(k, axis=1, keepdims=True)

    k_s, k_t = kernel(f_s), kernel(f_t)
    return jnp.mean(k_t * jnp.log((k_t + eps) / (k_s + eps)))


def pairwise_distances(e, eps: float = 1e-12):
    """RKD's pdist: Euclidean distances with the squared value clamped at eps, diagonal set to exactly 0."""
    sq = jnp.sum(e * e, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.dot(e, e.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sqrt(jnp.maximum(d2, eps))
    return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def smooth_l1(x, y):
    """PyTorch's smooth_l1_loss with beta 1, mean reduction."""
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def _normalised_distances(e):
    d = pairwise_distances(e)
    positive = d > 0
    mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.sum(positive)
    return d / mean


def _angles(e):
    """cos of the angle at j between (e_k - e_j) and (e_l - e_j): ``[B, B, B]``."""
    diff = e[None, :, :] - e[:, None, :]  # diff[j, k] = e_k - e_j
    unit = l2_normalize(diff, axis=2)
    return jnp.einsum("jkd,jld->jkl", unit, unit, precision=jax.lax.Precision.HIGHEST)


def rkd_loss(f_s, f_t, w_d: float = 25.0, w_a: float = 50.0):
    """RKD: w_d * smoothL1 of mean-normalised pairwise distances + w_a * smoothL1 of triplet angle cosines."""
    s = f_s.reshape(f_s.shape[0], -1)
    t = f_t.reshape(f_t.shape[0], -1)
    loss_d = smooth_l1(_normalised_distances(s), _normalised_distances(t))
    loss_a = smooth_l1(_angles(s), _angles(t))
    return w_d * loss_d + w_a * loss_a


def vid_nll(pred_mean, pred_var, target):
    """VID's Gaussian negative log-likelihood (without the constant), averaged over all elements."""
    return jnp.mean(0.5 * ((pred_mean - target) ** 2 / pred_var + jnp.log(pred_var)))


def mse(x, y):
    return jnp.mean((x - y) ** 2)


def _paired_maps(feats_s, feats_t):
    """The original's ``zip(f_s[1:-1], f_t[1:-1])``."""
    return list(zip(feats_s[1:-1], feats_t[1:-1]))


# ----------------------------------------------------------------------------------------------------------------
# Distillers


@register
@dataclasses.dataclass(frozen=True)
class Hint(Distiller):
    """FitNet: MSE between ConvReg(f_s[hint_layer]) and f_t[hint_layer].

    params = ``{'conv_reg': ...}``; state = ``{'batch_stats': ...}``: the regressor's BatchNorm runs in train
    mode during training (batch statistics, as the original's ``module.train()``) and its running statistics
    are carried in ``state`` so that they are updated and checkpointed as in the original. ``train=False`` uses
    the running statistics.
    """

    name: ClassVar[str] = "hint"
    uses_features: ClassVar[bool] = True
    beta: float = 100.0
    hint_layer: int = option(2, "feature index")

    def _shapes(self, feats_s, feats_t):
        check_feature_list(feats_s, "student", 2)
        check_feature_list(feats_t, "teacher", 2)
        n = min(len(feats_s), len(feats_t))
        if not -n <= self.hint_layer < n:
            raise ValueError(f"hint_layer={self.hint_layer} is outside the feature lists (lengths "
                             f"{len(feats_s)}, {len(feats_t)}); use 0..{n - 1}")
        s, t = shape_of(feats_s[self.hint_layer]), shape_of(feats_t[self.hint_layer])
        check_map(s, f"student feature {self.hint_layer}")
        check_map(t, f"teacher feature {self.hint_layer}")
        return s, t

    def module(self, feats_s, feats_t):
        s, t = self._shapes(feats_s, feats_t)
        return heads.ConvReg(s_shape=s, t_shape=t)

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        module = self.module(feats_s, feats_t)
        x = jnp.zeros(module.s_shape, jnp.float32)
        variables = module.init(key, x, train=False)
        return {"conv_reg": variables["params"]}, {"batch_stats": {"conv_reg": variables["batch_stats"]}}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        module = self.module(feats_s, feats_t)
        f_s = student_features([feats_s[self.hint_layer]])[0]
        f_t = teacher_features([feats_t[self.hint_layer]])[0]
        out, state = apply_bn_head(module, params, state, "conv_reg", f_s, train)
        return mse(out, f_t), state


@register
@dataclasses.dataclass(frozen=True)
class AT(Distiller):
    """Attention transfer over f[1:-1], summed over layers."""

    name: ClassVar[str] = "at"
    uses_features: ClassVar[bool] = True
    beta: float = 1000.0
    p: float = option(2.0, "exponent of the attention map")

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        check_feature_list(feats_s, "student", 3)
        check_feature_list(feats_t, "teacher", 3)
        for i, (s, t) in enumerate(_paired_maps(feats_s, feats_t), start=1):
            check_map(shape_of(s), f"student feature {i}")
            check_map(shape_of(t), f"teacher feature {i}")
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        pairs = _paired_maps(student_features(feats_s), teacher_features(feats_t))
        return sum(at_loss(s, t, self.p) for s, t in pairs), state


@register
@dataclasses.dataclass(frozen=True)
class SP(Distiller):
    """Similarity-preserving KD on f[-2]."""

    name: ClassVar[str] = "sp"
    uses_features: ClassVar[bool] = True
    beta: float = 3000.0

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        check_feature_list(feats_s, "student", 2)
        check_feature_list(feats_t, "teacher", 2)
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        return sp_loss(student_features([feats_s[-2]])[0], teacher_features([feats_t[-2]])[0]), state


@register
@dataclasses.dataclass(frozen=True)
class PKT(Distiller):
    """Probabilistic knowledge transfer on the pooled f[-1]."""

    name: ClassVar[str] = "pkt"
    uses_features: ClassVar[bool] = True
    beta: float = 30000.0
    eps: float = option(1e-7, "numerical epsilon")

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        check_feature_list(feats_s, "student", 1)
        check_feature_list(feats_t, "teacher", 1)
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        f_s = student_features([feats_s[-1]])[0]
        f_t = teacher_features([feats_t[-1]])[0]
        return pkt_loss(f_s, f_t, self.eps), state


@register
@dataclasses.dataclass(frozen=True)
class RKD(Distiller):
    """Relational KD (distance and angle) on the pooled f[-1]."""

    name: ClassVar[str] = "rkd"
    uses_features: ClassVar[bool] = True
    beta: float = 1.0
    w_d: float = option(25.0, "distance weight")
    w_a: float = option(50.0, "angle weight")

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        check_feature_list(feats_s, "student", 1)
        check_feature_list(feats_t, "teacher", 1)
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        f_s = student_features([feats_s[-1]])[0]
        f_t = teacher_features([feats_t[-1]])[0]
        return rkd_loss(f_s, f_t, self.w_d, self.w_a), state


@register
@dataclasses.dataclass(frozen=True)
class VID(Distiller):
    """Variational information distillation over f[1:-1]: one regressor per layer pair, NLLs summed.

    params = ``{'regressor_1': ..., 'regressor_2': ...}`` (numbered by feature index); each regressor's hidden
    width is the teacher's channel count, as the original's ``VIDLoss(s, t, t)``.
    """

    name: ClassVar[str] = "vid"
    uses_features: ClassVar[bool] = True
    beta: float = 1.0
    init_pred_var: float = option(5.0, "initial predicted variance")
    eps: float = option(1e-5, "numerical epsilon")

    def _modules(self, feats_s, feats_t):
        check_feature_list(feats_s, "student", 3)
        check_feature_list(feats_t, "teacher", 3)
        modules = []
        for i, (s, t) in enumerate(_paired_maps(feats_s, feats_t), start=1):
            s, t = shape_of(s), shape_of(t)
            check_map(s, f"student feature {i}")
            check_map(t, f"teacher feature {i}")
            modules.append((f"regressor_{i}", s, heads.VIDRegressor(t[3], t[3], self.init_pred_var, self.eps)))
        return modules

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        params = {}
        modules = self._modules(feats_s, feats_t)
        for k, (name, s_shape, module) in zip(jax.random.split(key, len(modules)), modules):
            # The regressor sees the student map after size matching, but 1x1 convs only care about channels.
            params[name] = module.init(k, jnp.zeros((1, 1, 1, s_shape[3]), jnp.float32))["params"]
        return params, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        pairs = _paired_maps(student_features(feats_s), teacher_features(feats_t))
        total = jnp.zeros((), jnp.float32)
        for (name, _, module), (f_s, f_t) in zip(self._modules(feats_s, feats_t), pairs):
            f_s, f_t = match_spatial(f_s, f_t)
            pred_mean, pred_var = module.apply({"params": params[name]}, f_s)
            total = total + vid_nll(pred_mean, pred_var, f_t)
        return total, state

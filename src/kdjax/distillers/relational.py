"""NST, KD-SVD and CC: the pure losses, CC's linear embedding head, and ``Distiller`` wrappers.

Feature maps are NHWC, as ``model.apply(..., features=True)`` returns them; the losses compute in float32 and the
teacher side is a constant. Checked against the official PyTorch code (RepDistiller's zoo as the Good-DA-in-KD
paper code ships it) in tests/test_distiller_fixtures.py.

* NST (neuron selectivity transfer): per layer, each channel's spatial map is L2-normalised and the squared
  maximum mean discrepancy with the degree-2 polynomial kernel k(x, y) = (x . y)² is taken between the student's
  and the teacher's sets of channel maps (one set per sample, averaged over the batch). Layers f[1:-1], summed;
  maps of different size are matched as AT does. RepDistiller's CIFAR-100 beta: 50.
* KD-SVD: per layer, the leading right-singular vectors (over channels) of the ``[H*W, C]`` matrix of each sample:
  1 for the teacher, 4 for the student, of which the one best aligned (largest |cos|) with the teacher's is kept,
  sign-corrected. The loss compares Gaussian-RBF relations, exp(-(v_l[i] - v_{l-1}[j])² / 8), between the vectors
  of consecutive layers: squared differences, summed, divided by the batch size. Layers f[1:-1]; student and
  teacher must have the same channel count at each layer. No beta for it in RepDistiller's script; mdistiller
  uses 1.
  Signs (``distill.svd_signs``): the RBF relations between layers change with the relative sign of consecutive
  layers' teacher vectors, which no SVD defines. 'original' (default) keeps them as the SVD returns them, as the
  original does, so, as the original's, its value depends on the SVD library: PyTorch's CPU wheels (MKL's
  LAPACK) return the leading vector of a non-negative [H*W, C] matrix with a negative sum when H*W >= C and a
  positive one when H*W < C (wrn_40_2's f3, vgg13's f2-f4, resnet32x4's f3), NumPy's OpenBLAS LAPACK, which
  kdjax uses on CPU, a negative one in both cases seen (tests/test_kdsvd.py), cuSOLVER its own. 'aligned' flips
  each teacher vector to a non-negative sum, the same convention at every layer and on every backend. The two
  agree whenever the SVD returned one sign for all layers of a sample (a global flip leaves the loss unchanged).
  docs/fidelity.md, "KD-SVD", says what is compared with the original and how.
* CC (correlation congruence, the variant RepDistiller got from the authors): both pooled features go through a
  trainable linear embedding (``LinearEmbed``, 128-d, no normalisation); with d = |e_s - e_t|, the loss is the
  mean over consecutive sample pairs (i, i+1) of sum_k d[i, k] d[i+1, k]. RepDistiller's CIFAR-100 beta: 0.02.
"""
import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.distillers.interface import (Distiller, check_feature_list, check_map, l2_normalize, match_spatial,
                                   shape_of, student_features, teacher_features)
from kdjax.distillers.registry import option, register
from kdjax.distillers.svd import singular_values_and_right_vectors

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------------
# NST


def _channel_maps(f):
    """``[B, H, W, C]`` -> ``[B, C, H*W]`` with each channel's map L2-normalised."""
    b, h, w, c = f.shape
    return l2_normalize(jnp.transpose(f.reshape(b, h * w, c), (0, 2, 1)), axis=2)


def _mean_poly_kernel(x, y):
    """mean over b, i, j of (x[b, i] . y[b, j])²."""
    return jnp.mean(jnp.einsum("bik,bjk->bij", x, y, precision=HIGHEST) ** 2)


def nst_loss(f_s, f_t):
    """One layer of NST: MMD² with the (x . y)² kernel between the normalised channel maps, after size matching.
    The teacher-teacher term is a constant but kept, so the value is the full MMD²."""
    f_s, f_t = match_spatial(f_s, f_t)
    s, t = _channel_maps(f_s), _channel_maps(jax.lax.stop_gradient(f_t))
    return _mean_poly_kernel(t, t) + _mean_poly_kernel(s, s) - 2.0 * _mean_poly_kernel(s, t)


# ----------------------------------------------------------------------------------------------------------------
# KD-SVD


def _finite(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _leading_right_vectors(f, n: int):
    """The first ``n`` right-singular vectors ``[B, C, n]`` of each sample's ``[H*W, C]`` matrix, with the signs the
    SVD returns them with, and the first n singular values ``[B, n]`` scaled to unit norm; both with non-finite
    entries zeroed. The SVD is ``kdjax.distillers.svd``'s (NumPy's on CPU: XLA:CPU's batched SVD can deadlock)."""
    b, h, w, c = f.shape
    sv, v = singular_values_and_right_vectors(f.reshape(b, h * w, c))
    v = _finite(v)[:, :, :n]
    sv = _finite(sv)[:, :n]
    return l2_normalize(v, axis=1), l2_normalize(sv, axis=1)


def _positive_sum(v):
    """Each column of ``[B, C, n]`` with the sign that makes its sum >= 0 (a zero sum keeps its sign)."""
    return v * jnp.where(jnp.sum(v, axis=1, keepdims=True) < 0, -1.0, 1.0)


# How KD-SVD signs each teacher singular vector (``distill.svd_signs``).
SVD_SIGNS = ("original", "aligned")


def _teacher_signs(v_t, signs, layer: int):
    """The teacher vectors ``[B, C, k]`` of ``layer`` signed as ``signs`` asks: 'original' as the SVD returned
    them, 'aligned' with a non-negative sum, or an array ``[layers, B, k]`` of +-1 multiplying the aligned vectors
    (the signs another SVD library gave, to compare against it)."""
    if isinstance(signs, str):
        return v_t if signs == "original" else _positive_sum(v_t)
    return _positive_sum(v_t) * jnp.asarray(signs, v_t.dtype)[layer][:, None, :]


def _align(v_s, v_t):
    """For each teacher vector, the student vector with the largest |cos| to it, with the sign of that cos."""
    cos = jnp.einsum("bci,bcj->bij", v_s, v_t, precision=HIGHEST)  # [B, n_s, n_t]
    best = jnp.max(jnp.abs(cos), axis=1, keepdims=True)
    pick = jax.lax.stop_gradient(jnp.where(jnp.abs(cos) == best, jnp.sign(cos), 0.0))
    return jnp.einsum("bci,bij->bcj", v_s, pick, precision=HIGHEST)


def _rbf(v, v_prev):
    """exp(-(v[b, i, k] - v_prev[b, j, k])² / 8): ``[B, C_l, C_{l-1}, k]``."""
    return jnp.exp(-((v[:, :, None, :] - v_prev[:, None, :, :]) ** 2) / 8.0)


def kdsvd_loss(feats_s, feats_t, k: int = 1, signs="original"):
    """KD-SVD over paired lists of NHWC maps (the original's f[1:-1]): RBF relations between the aligned singular
    vectors of consecutive layers, squared differences summed and divided by the batch size, summed over the
    consecutive pairs. Needs at least two layers for a non-zero value. ``signs``: the teacher vectors' signs,
    'original' (as the SVD returns them, the original code's), 'aligned' or a ``[layers, B, k]`` array (see
    ``_teacher_signs``); the student's signs never matter (each is matched to its teacher vector's)."""
    if isinstance(signs, str) and signs not in SVD_SIGNS:
        raise ValueError(f"KD-SVD signs must be one of {', '.join(SVD_SIGNS)}, got {signs!r}")
    total = jnp.zeros((), jnp.float32)
    prev = None
    for layer, (f_s, f_t) in enumerate(zip(feats_s, feats_t)):
        if f_s.shape[-1] != f_t.shape[-1]:
            raise ValueError(f"KD-SVD needs the same channel count for student and teacher at each layer, got "
                             f"{f_s.shape[-1]} and {f_t.shape[-1]}")
        v_t, s_t = _leading_right_vectors(jax.lax.stop_gradient(f_t), k)
        v_t = _teacher_signs(v_t, signs, layer)
        v_s, _ = _leading_right_vectors(f_s, k + 3)
        v_s = _align(v_s, v_t)
        scale = s_t[:, None, :]
        v_t, v_s = v_t * scale, v_s * scale
        if prev is not None:
            diff = _rbf(v_s, prev[0]) - jax.lax.stop_gradient(_rbf(v_t, prev[1]))
            total = total + jnp.sum(_finite(diff * diff))
        prev = (v_s, v_t)
    return total / feats_s[0].shape[0]


# ----------------------------------------------------------------------------------------------------------------
# CC


def cc_loss(e_s, e_t):
    """CC on embeddings ``[B, D]``: mean over i < B-1 of sum_k |e_s - e_t|[i, k] * |e_s - e_t|[i+1, k].

    Both sides are differentiated: the teacher's embedding comes out of a trainable head."""
    d = jnp.abs(e_s - e_t)
    return jnp.mean(jnp.sum(d[:-1] * d[1:], axis=1))


def _torch_uniform(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LinearEmbed(nn.Module):
    """CC's head: flatten, then Linear(dim_in -> dim_out) with PyTorch's default init U(+-1/sqrt(dim_in)) for
    weight and bias; no normalisation. Params ``{'linear': {'kernel': [in, out], 'bias': [out]}}`` (the kernel is
    the PyTorch weight transposed)."""

    dim_out: int = 128

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        init = _torch_uniform(x.shape[-1])
        return nn.Dense(self.dim_out, kernel_init=init, bias_init=init, precision=HIGHEST, name="linear")(x)


# ----------------------------------------------------------------------------------------------------------------
# Distillers


def _paired_maps(feats_s, feats_t):
    return list(zip(feats_s[1:-1], feats_t[1:-1]))


def _check_maps(feats_s, feats_t):
    check_feature_list(feats_s, "student", 3)
    check_feature_list(feats_t, "teacher", 3)
    for i, (s, t) in enumerate(_paired_maps(feats_s, feats_t), start=1):
        check_map(shape_of(s), f"student feature {i}")
        check_map(shape_of(t), f"teacher feature {i}")


@register
@dataclasses.dataclass(frozen=True)
class NST(Distiller):
    """NST over f[1:-1], summed over layers."""

    name: ClassVar[str] = "nst"
    uses_features: ClassVar[bool] = True
    beta: float = 50.0

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        _check_maps(feats_s, feats_t)
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        pairs = _paired_maps(student_features(feats_s), teacher_features(feats_t))
        return sum(nst_loss(s, t) for s, t in pairs), state


@register
@dataclasses.dataclass(frozen=True)
class KDSVD(Distiller):
    """KD-SVD over f[1:-1]."""

    name: ClassVar[str] = "kdsvd"
    uses_features: ClassVar[bool] = True
    beta: float = 1.0
    k: int = option(1, "singular vectors kept per layer")
    # 'original': the teacher vectors' signs as the SVD returns them (the original code); 'aligned': each flipped
    # to a non-negative sum, the same for every layer (docs/fidelity.md, KD-SVD)
    svd_signs: str = option("original", "teacher singular vectors' signs: 'original' (as the SVD returns them) "
                                        "or 'aligned'")

    def __post_init__(self):
        if self.svd_signs not in SVD_SIGNS:
            raise ValueError(f"distill.svd_signs must be one of {', '.join(SVD_SIGNS)}, got {self.svd_signs!r}")

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        _check_maps(feats_s, feats_t)
        for i, (s, t) in enumerate(_paired_maps(feats_s, feats_t), start=1):
            if shape_of(s)[3] != shape_of(t)[3]:
                raise ValueError(f"KD-SVD needs equal student/teacher channels at feature {i}, got "
                                 f"{shape_of(s)[3]} and {shape_of(t)[3]}")
        return {}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        pairs = _paired_maps(student_features(feats_s), teacher_features(feats_t))
        return kdsvd_loss([s for s, _ in pairs], [t for _, t in pairs], self.k, self.svd_signs), state


@register
@dataclasses.dataclass(frozen=True)
class CC(Distiller):
    """CC on the pooled f[-1] through two trainable ``LinearEmbed`` heads: params ``{'embed_s', 'embed_t'}``."""

    name: ClassVar[str] = "cc"
    uses_features: ClassVar[bool] = True
    beta: float = 0.02
    feat_dim: int = option(128, "embedding size")

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        check_feature_list(feats_s, "student", 1)
        check_feature_list(feats_t, "teacher", 1)
        k_s, k_t = jax.random.split(key)
        embed = LinearEmbed(self.feat_dim)
        dim_s = math.prod(shape_of(feats_s[-1])[1:])
        dim_t = math.prod(shape_of(feats_t[-1])[1:])
        return {"embed_s": embed.init(k_s, jnp.zeros((1, dim_s), jnp.float32))["params"],
                "embed_t": embed.init(k_t, jnp.zeros((1, dim_t), jnp.float32))["params"]}, {}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        f_s = student_features([feats_s[-1]])[0]
        f_t = teacher_features([feats_t[-1]])[0]
        embed = LinearEmbed(self.feat_dim)
        e_s = embed.apply({"params": params["embed_s"]}, f_s)
        e_t = embed.apply({"params": params["embed_t"]}, f_t)
        return cc_loss(e_s, e_t), state

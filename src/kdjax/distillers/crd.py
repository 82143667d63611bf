"""Contrastive representation distillation (CRD), with its memory banks and negatives on the device.

Per step, for a batch with dataset indices ``idx`` and labels ``y``:

1. v_s = Embed_s(f_s[-1]), v_t = Embed_t(f_t[-1]): Linear to ``feat_dim`` = 128 and L2 normalisation.
2. Contrast indices ``[B, 1 + K]``: column 0 is the anchor's own index (the original's mode 'exact'), then
   K = ``nce_k`` negatives drawn uniformly from the samples of *other* classes.
3. Scores against the other side's bank: out_s = exp(<M_t[j], v_s> / T), out_t = exp(<M_s[j], v_t> / T),
   T = 0.07, each divided by a constant Z = mean(out) * N fixed at the first call and then kept in ``state``.
4. NCE loss with noise P_n = 1/N and m = K, for both anchors: L = L(out_s) + L(out_t).
5. Bank update after scoring: M[idx] <- normalise(0.5 * M[idx] + 0.5 * v), for both banks.

Negatives, a deliberate deviation: the original's data loader draws the K negatives of each anchor
*without* replacement (with replacement only when fewer than K candidates exist). Here they are K independent
uniform draws from the anchor's other-class samples, with replacement, so that shapes stay static and no host
work is needed. With CIFAR-100 (49,500 candidates, K = 16,384) the expected number of repeated negatives per
anchor is about 2,400 (of 16,384 draws); every draw keeps the same marginal distribution, so the expected
loss is unchanged and only its variance differs slightly. For small datasets with fewer than K candidates,
replacement is what the original does as well.
Sampling uses the training labels sorted by class: a uniform position u in [0, N - n_c) skips the block of
class c, so no [C, N] table is needed.

Scoring: when the batch's score matrix ``[B, N]`` is smaller than the gathered bank rows ``[B, 1 + K, D]``
(CIFAR: 64 x 50,000 against 64 x 16,385 x 128) the scores are one matmul with the whole bank followed by a
gather of the K + 1 columns; otherwise the rows are gathered as in the original. Both give the same numbers
(full float32 precision in both, since the temperature 0.07 magnifies matmul rounding).

State (all plain arrays, checkpointed with the student): ``memory_s``/``memory_t`` [N, D] float32 (banks of
student/teacher embeddings), ``z_s``/``z_t`` float32 scalars (-1 until fixed, the original's convention),
``order`` [N] int32 (dataset indices sorted by class), ``class_start``/``class_count`` [C] int32.
Params: ``{'embed_s': ..., 'embed_t': ...}``; both heads are trainable (and weight-decayed in the original).
"""
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distillers import heads
from kdjax.distillers.interface import (Distiller, check_feature_list, shape_of, student_features,
                                   teacher_features)
from kdjax.distillers.registry import option, register

NCE_EPS = 1e-7
HIGHEST = jax.lax.Precision.HIGHEST


def class_tables(train_labels, num_train: int):
    """``(order, class_start, class_count)`` of integer training labels, for ``sample_negatives``."""
    labels = np.asarray(train_labels).reshape(-1)
    if labels.shape[0] != num_train:
        raise ValueError(f"train_labels has {labels.shape[0]} entries but num_train={num_train}; pass the labels "
                         "of the whole training set in dataset-index order")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("train_labels must be non-negative integer class ids")
    num_classes = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable").astype(np.int32)
    count = np.bincount(labels, minlength=num_classes).astype(np.int32)
    start = (np.cumsum(count) - count).astype(np.int32)
    if np.any(num_train - count[count > 0] <= 0):
        raise ValueError("CRD needs at least two classes in the training set to draw negatives")
    return order, start, count


def sample_negatives(key, labels, order, class_start, class_count, k: int):
    """``[B, k]`` dataset indices drawn uniformly, with replacement, from the samples whose class is not
    ``labels[b]``: a uniform position among the N - n_c other-class positions of ``order``, shifted past the
    contiguous block of class c."""
    labels = labels.astype(jnp.int32)
    start = class_start[labels][:, None]
    count = class_count[labels][:, None]
    n = order.shape[0]
    u = jax.random.randint(key, (labels.shape[0], k), 0, n - count, dtype=jnp.int32)
    return order[u + jnp.where(u >= start, count, 0)]


def contrast_indices(key, labels, indices, state, nce_k: int):
    """``[B, 1 + nce_k]``: the anchors' own indices (positives) then their negatives."""
    neg = sample_negatives(key, labels, state["order"], state["class_start"], state["class_count"], nce_k)
    return jnp.concatenate([indices.astype(jnp.int32)[:, None], neg], axis=1)


def contrast_scores(v, memory, idx, temperature: float):
    """exp(<memory[idx[b, j]], v[b]> / T), shape ``[B, 1 + K]``; the bank is a constant."""
    memory = jax.lax.stop_gradient(memory)
    b, k1 = idx.shape
    n, d = memory.shape
    if b * n <= b * k1 * d:
        dots = jnp.take_along_axis(jnp.dot(v, memory.T, precision=HIGHEST), idx, axis=1)
    else:
        dots = jnp.einsum("bkd,bd->bk", memory[idx], v, precision=HIGHEST)
    return jnp.exp(dots / temperature)


def fixed_normaliser(out, z_state, num_train: int):
    """Z: the stored constant once set (> 0), else mean(out) * N from this call (a constant, no gradient)."""
    first = jax.lax.stop_gradient(jnp.mean(out)) * num_train
    return jnp.where(z_state > 0, z_state, first)


def nce_loss(p, num_train: int):
    """The original's ContrastLoss on normalised scores ``p`` [B, 1 + K] (column 0 the positive)."""
    b, k1 = p.shape
    m_pn = (k1 - 1) / float(num_train)
    log_d1 = jnp.log(p[:, 0] / (p[:, 0] + m_pn + NCE_EPS))
    log_d0 = jnp.log(m_pn / (p[:, 1:] + m_pn + NCE_EPS))
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / b


def update_memory(memory, indices, v, momentum: float):
    """M[idx] <- normalise(momentum * M[idx] + (1 - momentum) * v); no gradient flows into the bank."""
    v = jax.lax.stop_gradient(v)
    rows = momentum * memory[indices] + (1.0 - momentum) * v
    rows = rows / jnp.sqrt(jnp.sum(rows * rows, axis=1, keepdims=True))
    return memory.at[indices].set(rows)


@register
@dataclasses.dataclass(frozen=True)
class CRD(Distiller):
    """CRD on the pooled features f[-1]. ``loss`` needs ``labels``, ``indices`` (dataset indices) and ``key``."""

    name: ClassVar[str] = "crd"
    needs_indices: ClassVar[bool] = True
    uses_features: ClassVar[bool] = True
    beta: float = 0.8
    feat_dim: int = option(128, "embedding size")
    nce_k: int = option(16384, "negatives per anchor, drawn with replacement")
    nce_t: float = option(0.07, "temperature of the NCE softmax")
    nce_m: float = option(0.5, "memory-bank momentum")

    def __post_init__(self):
        if self.feat_dim < 1 or self.nce_k < 1:
            raise ValueError(f"CRD needs feat_dim >= 1 and nce_k >= 1, got {self.feat_dim}, {self.nce_k}")
        if not 0.0 <= self.nce_m < 1.0 or self.nce_t <= 0:
            raise ValueError(f"CRD needs 0 <= nce_m < 1 and nce_t > 0, got {self.nce_m}, {self.nce_t}")

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        check_feature_list(feats_s, "student", 1)
        check_feature_list(feats_t, "teacher", 1)
        if num_train is None or train_labels is None:
            raise ValueError("CRD's init needs num_train and train_labels (memory banks and negative sampling)")
        order, start, count = class_tables(train_labels, int(num_train))
        k_s, k_t, k_ms, k_mt = jax.random.split(key, 4)
        dim_s = math.prod(shape_of(feats_s[-1])[1:])
        dim_t = math.prod(shape_of(feats_t[-1])[1:])
        embed = heads.Embed(self.feat_dim)
        params = {"embed_s": embed.init(k_s, jnp.zeros((1, dim_s), jnp.float32))["params"],
                  "embed_t": embed.init(k_t, jnp.zeros((1, dim_t), jnp.float32))["params"]}
        stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
        bank = lambda k: jax.random.uniform(k, (int(num_train), self.feat_dim), jnp.float32, -stdv, stdv)  # noqa
        state = {"memory_s": bank(k_ms), "memory_t": bank(k_mt),
                 "z_s": jnp.full((), -1.0, jnp.float32), "z_t": jnp.full((), -1.0, jnp.float32),
                 "order": jnp.asarray(order), "class_start": jnp.asarray(start),
                 "class_count": jnp.asarray(count)}
        return params, state

    def embed(self, params, feats_s, feats_t):
        """The L2-normalised 128-d embeddings ``(v_s, v_t)`` of the batch."""
        f_s = student_features([feats_s[-1]])[0]
        f_t = teacher_features([feats_t[-1]])[0]
        embed = heads.Embed(self.feat_dim)
        v_s = embed.apply({"params": params["embed_s"]}, f_s.reshape(f_s.shape[0], -1))
        v_t = embed.apply({"params": params["embed_t"]}, f_t.reshape(f_t.shape[0], -1))
        return v_s, v_t

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        if labels is None or indices is None or key is None:
            raise ValueError("CRD's loss needs labels, indices (dataset indices of the batch rows) and key")
        num_train = state["memory_s"].shape[0]
        v_s, v_t = self.embed(params, feats_s, feats_t)
        idx = contrast_indices(key, labels, indices, state, self.nce_k)
        # Student anchor against the teacher bank, and the reverse (the original's out_v1 / out_v2).
        out_s = contrast_scores(v_s, state["memory_t"], idx, self.nce_t)
        out_t = contrast_scores(v_t, state["memory_s"], idx, self.nce_t)
        z_s = fixed_normaliser(out_s, state["z_s"], num_train)
        z_t = fixed_normaliser(out_t, state["z_t"], num_train)
        loss = nce_loss(out_s / z_s, num_train) + nce_loss(out_t / z_t, num_train)
        if not train:
            return loss, state
        indices = indices.astype(jnp.int32)
        new_state = {**state, "z_s": z_s, "z_t": z_t,
                     "memory_s": update_memory(state["memory_s"], indices, v_s, self.nce_m),
                     "memory_t": update_memory(state["memory_t"], indices, v_t, self.nce_m)}
        return loss, new_state

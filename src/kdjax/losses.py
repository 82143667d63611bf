"""The classification and distillation losses of the KD step (docs/fidelity.md, "KD loss and the step").

All reductions are over the batch axis of ``[B, C]`` logits; everything is computed in float32 whatever the
dtype of the logits, because the softmax of a bfloat16 student loses the small probabilities that KL depends on.
The feature distillers (CRD, FitNet, ...) live in ``kdjax.distillers``.
"""
import jax
import jax.numpy as jnp


def cross_entropy(logits, labels):
    """Mean cross-entropy of ``[B, C]`` logits against integer ``[B]`` labels (PyTorch's CrossEntropyLoss)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    return -jnp.mean(picked)


def kd_kl_per_sample(student_logits, teacher_logits, T: float = 4.0):
    """Per-row KL(softmax(t/T) || softmax(s/T)), shape ``[B]``, without the T² factor (CutMixPick's ``kld``
    score).

    Written with both log-softmaxes so that a teacher probability that underflows to 0 contributes 0, as
    PyTorch's ``kl_div`` does, instead of 0 * log 0 = nan. The teacher is a constant target (stop_gradient).
    """
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / T, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / T, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kd_kl(student_logits, teacher_logits, T: float = 4.0):
    """The original's DistillKL: batch-mean KL(softmax(t/T) || softmax(s/T)) times T²."""
    return jnp.mean(kd_kl_per_sample(student_logits, teacher_logits, T)) * (T * T)


def entropy(logits):
    """Per-row entropy (nats) of softmax(logits) at temperature 1: the CutMixPick score. Shape ``[B]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

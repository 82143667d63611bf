"""Per-sample scores that CutMixPick ranks its pool by; step builders use them inside ``score_fn``.

Both work from log-softmax, so a confident row whose smallest probabilities underflow to zero scores a
finite number; the original's ``-(p * log p).sum()`` returns NaN for such a row (0 * -inf).
"""
import jax
import jax.numpy as jnp


def entropy(logits) -> jnp.ndarray:
    """Entropy of softmax(logits) at temperature 1, one value per row: ``-sum_c p_c log p_c`` (nats)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def kld_score(student_logits, teacher_logits, T: float = 4.0) -> jnp.ndarray:
    """Per-row ``sum_c KL(softmax(t/T) || softmax(s/T))``, without the T^2 factor of the loss: the original's
    ``kld`` pick criterion (``F.kl_div(log_softmax(s/T), softmax(t/T), reduction='none').sum(1)``)."""
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / T, axis=-1)
    log_q_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / T, axis=-1)
    return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_q_s), axis=-1)

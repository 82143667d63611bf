"""Per-sample weights of the logit terms: EA-KD's entropy weights (``loss.sample_weights=entropy``).

EA-KD (Su et al.; cpsu00/EA-KD, mdistiller/distillers/KD.py:8-26 and DKD.py:7-49) multiplies each sample's KD (or
DKD) loss by a weight from the teacher's and the student's entropies at temperature t = 3, held constant
(``detach``), before the batch mean:

    w = (H_t + H_t * H_s / H_ub) / 2,    H = -sum_c p log(max(p, 1e-10)),  p = softmax(z / t)

with ``H_ub`` 100 on CIFAR-100 (and on any dataset but ImageNet, where it is log 1000): the official constant,
although log 100 would be CIFAR-100's entropy bound; kdjax keeps 100 so that the weights are the official ones.
Samples the teacher is unsure of (high entropy, more "dark knowledge") weigh more, more so where the student is
unsure too.

This *weights* every sample; CutMixPick's entropy criterion *selects* the images of x' by entropy. The two compose:
the weights apply to the logit terms on x and on x' alike.
"""
import jax
import jax.numpy as jnp

# loss.sample_weights values: 'none' (the plain batch mean) or 'entropy' (EA-KD's weights).
SAMPLE_WEIGHTS = ("none", "entropy")
# The official constants: cfg.DISTILLER.t (mdistiller/engine/cfg.py:39) and H_ub for a dataset that is not ImageNet.
EA_TEMPERATURE = 3.0
EA_ENTROPY_SCALE = 100.0


def _entropy(logits, t: float):
    p = jax.nn.softmax(jnp.asarray(logits).astype(jnp.float32) / t, axis=-1)
    return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-10)), axis=-1)


def entropy_weights(logits_s, logits_t, t: float = EA_TEMPERATURE, scale: float = EA_ENTROPY_SCALE):
    """EA-KD's per-sample weights ``[B]``: (H_t + H_t * H_s / scale) / 2 at temperature ``t``, a constant (no
    gradient) as the official ``get_w(...).detach()``."""
    h_t, h_s = _entropy(logits_t, t), _entropy(logits_s, t)
    return jax.lax.stop_gradient((h_t + h_t * h_s / scale) / 2.0)


def check_sample_weights(value: str, distiller) -> None:
    """One clear line for a value that is not known, or a distiller without per-sample losses."""
    if value not in SAMPLE_WEIGHTS:
        raise ValueError(f"loss.sample_weights must be one of {', '.join(SAMPLE_WEIGHTS)}, got {value!r}")
    name = "kd" if distiller is None else distiller.name
    if value != "none" and distiller is not None and not distiller.per_sample:
        raise ValueError(f"loss.sample_weights={value} weights the per-sample logit losses of kd and dkd (EA-KD's), "
                         f"not distiller={name}: unset loss.sample_weights or use distiller=kd or dkd")


def weighted_term(weights, distiller):
    """The KD step's logit term with EA-KD's weights: ``term(logits_s, logits_t, labels, epoch) = mean_b(w_b *
    L_b)`` with L_b the distiller's per-sample term (on z-scored logits at the base temperature under logit
    standardisation, the weights then computed from those, as the official LS-DKD with EA does)."""
    from kdjax.distillers.logit import standardize  # here: logit.py imports the interface this module sits beside
    check_sample_weights(weights.sample_weights, distiller)

    def term(logits_s, logits_t, labels, epoch, temperature=None):
        del temperature  # fixed: CTKD is refused with sample weights
        temperature = weights.temperature
        if weights.logit_stand:
            logits_s, logits_t, temperature = standardize(logits_s), standardize(logits_t), weights.ls_temperature
        w = entropy_weights(logits_s, logits_t)
        return jnp.mean(w * distiller.per_sample_logit_loss(logits_s, logits_t, labels, epoch, temperature))

    return term

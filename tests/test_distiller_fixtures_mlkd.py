"""MLKD against its official PyTorch code: the whole training loss (CE on both views, the weak view's masked
multi-temperature KD / class / batch terms, the strong view's KD) and its gradients with respect to both views'
student logits, on a committed fixture (tests/fixtures/distillers/mlkd.npz, written by
tests/fixtures/make_distiller_fixtures.py from Jin-Ying/Multi-Level-Logit-Distillation's
mdistiller/distillers/KD_ours.py in float64), with wrong constants and the paper's per-sample reading asserted to
land far off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distillers, losses
from kdjax.distillers import logit
from test_distiller_fixtures import assert_far, assert_grad, assert_value, load

CE, KD = 0.1, 0.9


def total(weak_loss, strong_loss, labels):
    """The official sum of ``losses_dict``: CE on both views with weight 0.1, the two views' terms with 0.9."""
    def fn(views, t_weak, t_strong):
        s_weak, s_strong = views
        ce = losses.cross_entropy(s_weak, labels) + losses.cross_entropy(s_strong, labels)
        return CE * ce + KD * (weak_loss(s_weak, t_weak) + strong_loss(s_strong, t_strong))
    return fn


def per_sample_masked_weak(s, t, temperature=4.0):
    """The paper's reading (and the official code's commented-out ``reduce=False``): the confidence mask selects
    samples inside the KD batch mean, instead of scaling the batch mean by the fraction it keeps."""
    p_t = jax.nn.softmax(t, axis=-1)
    conf = jnp.max(p_t, axis=-1)
    mask = (conf <= jnp.percentile(conf, 50.0)).astype(jnp.float32)
    fraction = jnp.mean(mask)
    out = logit.mlkd_weak_loss(s, t, temperature)
    for tau in (temperature, 3.0, 5.0, 2.0, 6.0):
        out = out - fraction * logit.kd_kl(s, t, tau) + jnp.mean(mask * losses.kd_kl_per_sample(s, t, tau)) * tau**2
    return out


def test_mlkd_matches_official():
    d = load("mlkd")
    assert (float(d["hp_temperature"]), float(d["hp_ce_weight"]), float(d["hp_kd_weight"])) == (4.0, CE, KD)
    assert (logit.MLKD_CIFAR100["ce_weight"], logit.MLKD_CIFAR100["kd_weight"]) == (CE, KD)
    views = (jnp.asarray(d["in_logits_s_weak"]), jnp.asarray(d["in_logits_s_strong"]))
    t_weak, t_strong = jnp.asarray(d["in_logits_t_weak"]), jnp.asarray(d["in_logits_t_strong"])
    y = jnp.asarray(d["in_labels"])
    mlkd = distillers.create("mlkd")
    official = total(logit.mlkd_weak_loss, logit.mlkd_strong_loss, y)
    by_class = total(lambda s, t: mlkd.logit_loss(s, t, None, 1, 4.0),
                     lambda s, t: mlkd.logit_loss_aug(s, t, None, 1, 4.0), y)
    strong_3 = lambda s, t: logit.kd_kl(s, t, 4.0) + logit.kd_kl(s, t, 3.0) + logit.kd_kl(s, t, 5.0)  # noqa: E731
    variants = [
        by_class,
        total(lambda s, t: logit.mlkd_weak_loss(s, t, 3.0), lambda s, t: logit.mlkd_strong_loss(s, t, 3.0), y),
        total(per_sample_masked_weak, logit.mlkd_strong_loss, y),  # the per-sample masks
        # without the weak KD_2 and KD_6 that the official loss_kd_strong adds
        total(lambda s, t: logit.mlkd_weak_loss(s, t) - logit.kd_kl(s, t, 2.0) - logit.kd_kl(s, t, 6.0),
              logit.mlkd_strong_loss, y),
        # the strong view's KD at all five temperatures
        total(logit.mlkd_weak_loss,
              lambda s, t: strong_3(s, t) + logit.kd_kl(s, t, 2.0) + logit.kd_kl(s, t, 6.0), y),
    ]

    @jax.jit
    def run(views):
        loss, grads = jax.value_and_grad(official)(views, t_weak, t_strong)
        return loss, grads, [v(views, t_weak, t_strong) for v in variants]

    loss, (g_weak, g_strong), (same, *wrong) = run(views)
    assert_value(loss, d["loss"])
    assert_value(same, d["loss"])
    assert_grad(g_weak, d["grad_logits_s_weak"], "d/d weak student logits")
    assert_grad(g_strong, d["grad_logits_s_strong"], "d/d strong student logits")
    for w in wrong:
        assert_far(w, d["loss"])
    # the parts the official dict reports: CE, KD (both views), class- and batch-level terms of the weak view
    s_w, s_s = views
    assert_value(CE * (losses.cross_entropy(s_w, y) + losses.cross_entropy(s_s, y)), d["out_loss_ce"])
    assert_far(CE * losses.cross_entropy(s_w, y), d["out_loss_ce"])  # CE on the weak view alone


def test_mlkd_masks_are_the_median_fractions():
    """15 rows and 11 classes: 8 rows and 6 classes at or below their median; the masks are constants."""
    d = load("mlkd")
    s, t = jnp.asarray(d["in_logits_s_weak"]), jnp.asarray(d["in_logits_t_weak"])
    p_t = jax.nn.softmax(t, axis=-1)
    assert float(logit._below_median_fraction(jnp.max(p_t, axis=-1))) == pytest.approx(8 / 15)
    assert float(logit._below_median_fraction(jnp.sum(p_t, axis=0))) == pytest.approx(6 / 11)
    # an even batch: its median is interpolated between the middle two, so exactly half
    assert float(logit._below_median_fraction(jnp.arange(6.0))) == 0.5
    # class term by hand: sum((P_t^T P_t - P_s^T P_s)^2) / C at T = 4
    ps, pt = np.asarray(jax.nn.softmax(s / 4, -1), np.float64), np.asarray(jax.nn.softmax(t / 4, -1), np.float64)
    want = np.sum((pt.T @ pt - ps.T @ ps) ** 2) / ps.shape[1]
    assert float(logit._gram_gap(jnp.asarray(ps, jnp.float32), jnp.asarray(pt, jnp.float32), True)) == \
        pytest.approx(want, rel=1e-5)


def test_mlkd_weights_and_refusals():
    mlkd = distillers.create("mlkd")
    assert mlkd.replaces_kl and mlkd.ce_on_aug and not mlkd.per_sample and not mlkd.uses_labels
    assert mlkd.default_weights("autoaugment") == {"gamma": CE, "alpha": KD, "beta": 0.0}
    assert "mlkd" in distillers.logit_names()
    with pytest.raises(ValueError, match="no '\\+KD' variant"):
        distillers.create("mlkd", with_kd=True)
    with pytest.raises(ValueError, match="not distiller=mlkd"):
        distillers.check_logit_stand(mlkd)

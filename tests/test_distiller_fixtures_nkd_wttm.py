"""NKD and WTTM against their official PyTorch code: value and gradient on committed fixtures
(tests/fixtures/distillers/{nkd,wttm}.npz, written by tests/fixtures/make_distiller_fixtures.py from yzd-v/cls_KD's
mmcls/models/dis_losses/nkd.py and zkxufo/TTM's distiller_zoo/wttm.py in float64), with wrong constants asserted
to land far off, and the distiller classes as the KD step calls them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distillers
from kdjax.distillers import logit
from test_distiller_fixtures import assert_far, assert_grad, assert_value, evaluate, load


def ttm(logits_s, logits_t, power):
    """TTM (the official distiller_zoo/ttm.py): WTTM's KL without the teacher's power-sum weight."""
    log_target = jax.nn.log_softmax(power * jax.nn.log_softmax(logits_t, axis=-1), axis=-1)
    log_s = jax.nn.log_softmax(logits_s, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_target) * (log_target - log_s), axis=-1))


def test_nkd_matches_official():
    d = load("nkd")
    s, t, y = jnp.asarray(d["in_logits_s"]), jnp.asarray(d["in_logits_t"]), jnp.asarray(d["in_labels"])
    temp, gamma = float(d["hp_temp"]), float(d["hp_gamma"])
    assert (temp, gamma) == (3.0, 3.5)
    nkd = distillers.create("nkd")
    loss, grad, (by_class, *wrong) = evaluate(
        lambda x: logit.nkd_loss(x, t, y, temp, gamma), s,
        lambda x: nkd.logit_loss(x, t, y, 1, 4.0),  # the defaults are the CIFAR-100 config's; loss.temperature unused
        lambda x: logit.nkd_loss(x, t, y, 4.0, gamma),  # another temperature
        lambda x: logit.nkd_loss(x, t, y, temp, 1.5),  # the ImageNet gamma
        lambda x: logit.nkd_loss(x, t, (y + 1) % s.shape[1], temp, gamma),  # other labels
        lambda x: logit.nkd_loss(x, t, y, temp, gamma) + gamma * temp * temp * 0.1)  # a constant off
    assert_value(loss, d["loss"])
    assert_grad(grad, d["grad_logits_s"], "d/d logits_s")
    assert_value(by_class, d["loss"])
    for w in wrong:
        assert_far(w, d["loss"])


def test_wttm_matches_official():
    d = load("wttm")
    s, t, power = jnp.asarray(d["in_logits_s"]), jnp.asarray(d["in_logits_t"]), float(d["hp_l"])
    assert power == 0.2
    wttm = distillers.create("wttm")
    loss, grad, (by_class, *wrong) = evaluate(
        lambda x: logit.wttm_loss(x, t, power), s,
        lambda x: wttm.logit_loss(x, t, None, 1, 4.0),  # the default power; loss.temperature unused
        lambda x: logit.wttm_loss(x, t, 0.25),  # another power
        lambda x: ttm(x, t, power),  # TTM: without the per-sample weight
        lambda x: logit.kd_kl(x, t, 1.0 / power))  # KD at T = 1 / power: the student softened too
    assert_value(loss, d["loss"])
    assert_grad(grad, d["grad_logits_s"], "d/d logits_s")
    assert_value(by_class, d["loss"])
    for w in wrong:
        assert_far(w, d["loss"])


def test_weights_options_and_bad_values():
    nkd, wttm = distillers.create("nkd"), distillers.create("wttm")
    assert nkd.replaces_kl and wttm.replaces_kl and nkd.uses_labels and not wttm.uses_labels
    assert nkd.default_weights("cutmix") == {"gamma": 1.0, "alpha": 1.0, "beta": 0.0}
    assert wttm.default_weights("identity") == {"gamma": 1.0, "alpha": 4.0, "beta": 0.0}
    assert {"nkd", "wttm"} <= set(distillers.logit_names())
    assert distillers.create("wttm", ttm_l=0.5).ttm_l == 0.5
    with pytest.raises(ValueError, match="ttm_l must be > 0"):
        distillers.create("wttm", ttm_l=0.0)
    with pytest.raises(ValueError, match="nkd_temp must be > 0"):
        distillers.create("nkd", nkd_temp=-1.0)
    with pytest.raises(ValueError, match="no '\\+KD' variant"):
        distillers.create("nkd", with_kd=True)
    with pytest.raises(ValueError, match="standardises the logits of kd and dkd, not distiller=wttm"):
        distillers.check_logit_stand(wttm)


def test_nkd_target_term_is_the_teachers_target_probability_times_the_students_log_probability():
    """A hand case: with gamma 0 NKD is -mean(p_t[y] log p_s[y])."""
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
    t = np.array([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
    y = np.array([0, 2])
    ps = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    pt = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    want = -np.mean(pt[[0, 1], y] * np.log(ps[[0, 1], y]))
    assert float(logit.nkd_loss(s, t, y, 3.0, 0.0)) == pytest.approx(want, rel=1e-5)

"""CTKD against its official PyTorch code (tests/fixtures/distillers/ctkd.npz, written by
tests/fixtures/make_distiller_fixtures.py from zhengli97/CTKD's models/temp_global.py, distiller_zoo/{KD,DKD}.py and
train_student.py's CosineDecay in float64): the curriculum's lambda per epoch, and the KD and DKD losses at the
learned global temperature with their gradients with respect to the student's logits and to the temperature's
parameter, whose gradient is the plain one times lambda (negative: reversed); wrong constants land far off."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.distillers import ctkd, logit
from test_distiller_fixtures import assert_far, assert_grad, assert_value, load

WEIGHTS = {"kd": (0.1, 0.9), "dkd": (1.0, 1.0)}  # (CE, loss): -r 0.1 -a 0.9 for KD; -r 1 -b 1 for DKD
# d loss / d theta goes through d loss / d T, and at T ~ 16 the T²-scaled loss hardly moves with T: a small
# difference of large float32 terms. Moving each float32 input logit by one ulp moves it by up to 4e-4 (relative)
# with jax 0.10 and 0.12 alike, and the two releases' programs land up to 1.5e-4 (0.10) and 2.3e-4 (0.12) from the
# float64 value, while kdjax's same code run in float64 matches it to 1e-13. 1e-3 is float32's resolution here, for
# the official value and for lambda times the plain gradient (two computations, rounded differently: 4e-5 apart with jax
# 0.12); a wrong lambda or T still lands far off (the assert_far checks below, and the temperature at VALUE_RTOL).
THETA_GRAD_RTOL = 1e-3


def loss_at(name, s, t, y, temperature):
    ce, w = WEIGHTS[name]
    term = logit.kd_kl(s, t, temperature) if name == "kd" else logit.dkd_loss(s, t, y, 1.0, 2.0, temperature)
    return ce * losses.cross_entropy(s, y) + w * term


def test_curriculum_lambda_is_the_official_cosine_decay():
    d = load("ctkd")
    got = jax.jit(ctkd.curriculum_lambda)(jnp.asarray(d["out_epochs"]))
    np.testing.assert_allclose(np.asarray(got), d["out_lambdas"], rtol=0, atol=1e-6)
    assert float(ctkd.CurriculumTemperature(mode="global").reversal_weight(3)) == pytest.approx(float(d["hp_lambda"]))
    # epoch 1 already reverses a little, from epoch 10 on fully; 5 loops would be another curriculum
    assert float(ctkd.curriculum_lambda(1)) < 0 and float(ctkd.curriculum_lambda(25)) == -1.0
    assert abs(float(ctkd.curriculum_lambda(3, loops=5)) - float(d["hp_lambda"])) > 0.1


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_ctkd_loss_and_gradients_match_official(name):
    d = load("ctkd")
    s, t, y = jnp.asarray(d["in_logits_s"]), jnp.asarray(d["in_logits_t"]), jnp.asarray(d["in_labels"])
    lam = float(d["hp_lambda"])
    theta = jnp.asarray(float(d[f"{name}_theta"]), jnp.float32)
    module = ctkd.CurriculumTemperature(mode="global")

    def official(s, theta):
        return loss_at(name, s, t, y, module.temperature(theta, int(d["hp_epoch"])))

    def plain(theta):  # no reversal: the temperature's own gradient
        return loss_at(name, s, t, y, 1.0 + 20.0 * jax.nn.sigmoid(theta))

    variants = [
        lambda s, th: loss_at(name, s, t, y, 4.0),  # the fixed temperature
    ]

    @jax.jit
    def run(s, theta):
        loss, (g_s, g_theta) = jax.value_and_grad(official, argnums=(0, 1))(s, theta)
        return loss, g_s, g_theta, jax.grad(plain)(theta), module.temperature(theta, 3), [v(s, theta) for v in variants]

    loss, g_s, g_theta, g_plain, temperature, wrong = run(s, theta)
    assert_value(temperature, d[f"{name}_temperature"])
    assert_value(loss, d[f"{name}_loss"])
    assert_grad(g_s, d[f"{name}_grad_logits_s"], "d/d logits_s")
    assert_value(g_theta, d[f"{name}_grad_theta"], rtol=THETA_GRAD_RTOL)
    # the gradient reversal: the parameter's gradient is the plain one times lambda (< 0: negated and scaled)
    assert float(g_theta) == pytest.approx(lam * float(g_plain), rel=THETA_GRAD_RTOL)
    assert np.sign(float(g_theta)) == -np.sign(float(g_plain))
    assert_far(g_plain, d[f"{name}_grad_theta"])  # without the reversal
    for w in wrong:
        assert_far(w, d[f"{name}_loss"])
    # at T ~ 16 the T²-scaled loss hardly moves with T (0.05% from T 16 to 8): another t_start or t_end shows in
    # the temperature itself
    assert_far(ctkd.learned_temperature(theta, lam, 2.0, 20.0), d[f"{name}_temperature"])
    assert_far(ctkd.learned_temperature(theta, lam, 1.0, 10.0), d[f"{name}_temperature"])


def test_scale_gradient_is_the_identity_forward_and_scales_backward():
    x = jnp.asarray(0.7)
    assert float(ctkd.scale_gradient(x, -0.25)) == pytest.approx(0.7)
    assert float(jax.grad(lambda v: 3.0 * ctkd.scale_gradient(v, -0.25))(x)) == pytest.approx(-0.75)
    assert float(jax.grad(lambda v: 3.0 * ctkd.scale_gradient(v, 0.0))(x)) == 0.0  # epoch 0: lambda_max 0


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="ctkd.mode must be one of none, global"):
        ctkd.CurriculumTemperature(mode="instance")
    with pytest.raises(ValueError, match="ctkd.loops must be >= 1"):
        ctkd.CurriculumTemperature(mode="global", loops=0)
    assert ctkd.CurriculumTemperature().enabled is False

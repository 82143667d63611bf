"""EA-KD's entropy weights (``loss.sample_weights=entropy``) against the official code (cpsu00/EA-KD's KD.py and
DKD.py with EA, fixture tests/fixtures/distillers/ea.npz), and as the KD step's logit term on x and x'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import distillers, losses
from kdjax.distillers import logit, sample_weights
from kdjax.train import steps
from test_distiller_fixtures import assert_far, assert_grad, assert_value, evaluate, load


@pytest.fixture(scope="module")
def ea():
    d = load("ea")
    return d, jnp.asarray(d["in_logits_s"]), jnp.asarray(d["in_logits_t"]), jnp.asarray(d["in_labels"])


def test_weights_are_the_official(ea):
    d, s, t, _ = ea
    assert (float(d["hp_t"]), float(d["hp_h_ub"])) == (3.0, 100.0)
    w = sample_weights.entropy_weights(s, t)
    np.testing.assert_allclose(np.asarray(w), d["out_weights"], rtol=1e-5)
    assert not np.allclose(np.asarray(sample_weights.entropy_weights(s, t, scale=np.log(100.0))), d["out_weights"],
                           rtol=1e-2)  # the entropy bound log 100 in place of the official 100 is caught
    assert float(jnp.sum(jax.grad(lambda x: jnp.sum(sample_weights.entropy_weights(x, t)))(s) ** 2)) == 0.0


def step_term(name, epoch=1):
    weights = steps.KDWeights(sample_weights="entropy")
    return steps.logit_term(weights, distillers.create(name, **({"warmup": 0} if name == "dkd" else {})))


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_weighted_kd_and_dkd_match_the_official(ea, name):
    d, s, t, y = ea
    term = step_term(name)
    plain = logit.dkd_loss if name == "dkd" else (lambda a, b, y: losses.kd_kl(a, b, 4.0))
    loss, grad, (unweighted, wrong_t) = evaluate(
        lambda x: term(x, t, y, 1), s,
        lambda x: plain(x, t, y),
        lambda x: jnp.mean(sample_weights.entropy_weights(x, t, t=4.0) * (
            logit.dkd_loss_per_sample(x, t, y) if name == "dkd" else losses.kd_kl_per_sample(x, t, 4.0) * 16.0)))
    assert_value(loss, d[f"loss_{name}"])
    assert_grad(grad, d[f"grad_{name}_logits_s"], "d/d logits_s")
    assert_far(unweighted, d[f"loss_{name}"])
    assert_far(wrong_t, d[f"loss_{name}"])


def test_refused_in_one_line_where_it_does_not_apply():
    with pytest.raises(ValueError, match="sample_weights=entropy weights the per-sample logit losses of kd and dkd"):
        sample_weights.check_sample_weights("entropy", distillers.create("dist"))
    with pytest.raises(ValueError, match="must be one of none, entropy"):
        sample_weights.check_sample_weights("teacher", None)
    sample_weights.check_sample_weights("entropy", distillers.create("crd"))  # its logit block is KD's
    sample_weights.check_sample_weights("none", distillers.create("dist"))


def test_the_step_weights_the_kd_terms_on_x_and_x_aug():
    """kd with loss.sample_weights=entropy under CutMix: gamma*CE + alpha*(lw1*mean(w*KL_b)(x) + lw3*(same)(x'))."""
    from test_train_steps_logit import LW_MIX, batch_of, make_step, reference_logits, setup
    s = setup("cutmix")
    weights = steps.KDWeights(lw_mix=LW_MIX, sample_weights="entropy")
    key = jax.random.key(1)
    _, metrics = make_step(s, weights, distillers.create("kd"))(s["state"], s["tvars"], batch_of(s), key)
    ls, lsa, lt, lta, _ = reference_logits(s, key)

    def weighted(z_s, z_t):
        return jnp.mean(sample_weights.entropy_weights(z_s, z_t) * losses.kd_kl_per_sample(z_s, z_t, 4.0) * 16.0)

    want = 0.1 * float(losses.cross_entropy(ls, s["labels"])) + 0.9 * (
        LW_MIX[0] * float(weighted(ls, lt)) + LW_MIX[2] * float(weighted(lsa, lta)))
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(float(weighted(ls, lt)), rel=1e-5)


def test_distill_refuses_it_before_loading_anything():
    from kdjax.train import kd
    from test_train_steps_logit import config_of
    config = config_of("distiller=dist,aug=cutmix")
    config.loss.sample_weights = "entropy"
    with pytest.raises(ValueError, match="not distiller=dist"):
        kd.validate(config)
    config = config_of("distiller=dkd,aug=cutmix")
    config.loss.sample_weights = "entropy"
    kd.validate(config)
    assert kd.KDMethod.from_config(config).weights.sample_weights == "entropy"

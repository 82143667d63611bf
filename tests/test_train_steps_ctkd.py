"""CTKD in the KD step: the logit terms (kd's KL on x and x', or dkd's loss) run at the learned temperature of
``state['extra']['ctkd']``, whose parameter is updated by the student's optimiser with its gradient scaled by the
curriculum's lambda of the step's epoch; refused in one line where the official code has no such combination."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from kdjax import distillers, losses
from kdjax.distillers import ctkd, logit
from kdjax.configs import fields
from kdjax.train import kd, steps
from test_train_steps_logit import (LR, LW_MIX, STEPS_PER_EPOCH, batch_of, dominant_labels, make_step,
                                    reference_logits, setup)

EPOCH = 3  # setup's state is at step 25 of 10 per epoch


def with_ctkd(s):
    params = ctkd.init_params()
    return dict(s["state"], extra={"ctkd": {"params": params, "opt_state": s["tx"].init(params), "state": {}}})


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_logit_terms_run_at_the_learned_temperature_and_theta_ascends(name):
    s = setup("cutmix")
    d = distillers.create(name, **({"warmup": 0} if name == "dkd" else {}))
    module = ctkd.CurriculumTemperature(mode="global")
    w = distillers.resolve_weights(d, "cutmix")
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], lw_mix=LW_MIX, ctkd=module)
    key = jax.random.key(1)
    state = with_ctkd(s)
    new_state, metrics = make_step(s, weights, d)(state, s["tvars"], batch_of(s), key)

    ls, lsa, lt, lta, aux = reference_logits(s, key)
    labels = s["labels"]

    def total(theta_temperature):
        if name == "kd":
            term = lambda a, b, y: logit.kd_kl(a, b, theta_temperature)  # noqa: E731
        else:
            y_aug = dominant_labels(aux, labels, lsa.shape[0])
            term = lambda a, b, y: logit.dkd_loss(a, b, y if y is not None else y_aug, 1.0, 8.0,  # noqa: E731
                                                  theta_temperature)
        return w["gamma"] * losses.cross_entropy(ls, labels) + w["alpha"] * (
            LW_MIX[0] * term(ls, lt, labels) + LW_MIX[2] * term(lsa, lta, None))

    temperature = float(1.0 + 20.0 * jax.nn.sigmoid(1.0))
    assert float(metrics["temperature"]) == pytest.approx(temperature, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(total(temperature)), rel=1e-5)
    assert abs(float(total(4.0)) - float(total(temperature))) > 1e-3 * float(total(temperature))
    # theta's SGD step: its gradient is lambda(epoch 3) times the plain one
    g_plain = jax.grad(lambda th: total(1.0 + 20.0 * jax.nn.sigmoid(th)))(jnp.asarray(1.0))
    lam = float(ctkd.curriculum_lambda(EPOCH))
    want = 1.0 - LR * lam * float(g_plain)
    got = float(new_state["extra"]["ctkd"]["params"]["theta"])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert np.sign(got - 1.0) == np.sign(float(g_plain))  # reversed: theta moves up the loss


def test_ctkd_config_block_weights_and_refusals():
    config = load_config("distill", "")
    assert config.ctkd.to_dict() == {"mode": "none", "t_start": 1.0, "t_end": 20.0, "loops": 10,
                                     "lambda_max": 0.0, "lambda_min": -1.0}
    assert kd.KDMethod.from_config(config).weights.ctkd is None
    for name in config.ctkd.keys():  # the block and its --help lines come from CurriculumTemperature's options
        assert fields.help_for(f"ctkd.{name}") == ctkd.option_help(name) and len(ctkd.option_help(name)) > 10
    config.ctkd.mode = "global"
    config.ctkd.loops = 5
    assert kd.KDMethod.from_config(config).weights.ctkd == ctkd.CurriculumTemperature(mode="global", loops=5)
    for name in ("nkd", "dist", "mlkd"):
        with pytest.raises(ValueError, match=f"not of distiller={name}"):
            ctkd.check_ctkd(ctkd.CurriculumTemperature(mode="global"), distillers.create(name), False, "none")
    ctkd.check_ctkd(ctkd.CurriculumTemperature(mode="global"), distillers.create("crd"), False, "none")  # KD beside
    with pytest.raises(ValueError, match="loss.logit_stand"):
        ctkd.check_ctkd(ctkd.CurriculumTemperature(mode="global"), None, True, "none")
    with pytest.raises(ValueError, match="loss.sample_weights"):
        ctkd.check_ctkd(ctkd.CurriculumTemperature(mode="global"), None, False, "entropy")
    with pytest.raises(ValueError, match="ctkd.mode needs steps_per_epoch"):
        s = setup("identity")
        steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"],
                           steps.KDWeights(ctkd=ctkd.CurriculumTemperature(mode="global")), 6)
    assert STEPS_PER_EPOCH == 10

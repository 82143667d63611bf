"""MLKD composed with every paper scheme in the KD step: x is MLKD's weak view, x' (the scheme's output) its strong
view. The step's loss is gamma*CE(s(x)) + gamma*CE(s(x'), the scheme's mixed labels) + alpha*(lw1*weak(s(x),
t(x)) + lw3*strong(s(x'), t(x'))) with the pure losses checked against the official code in
test_distiller_fixtures_mlkd.py, on the logits of the original's separate passes.

Three schemes in the default suite (a geometric one, a mixing one, one scored by the student: each compile costs
~10 s on 2 cores); the other six paper schemes behind ``slow``."""
import jax
import optax
import pytest

from kdjax import augment, distillers, losses
from kdjax.augment import transforms
from kdjax.distillers import logit
from kdjax.train import steps
from test_train_steps_logit import LW_MIX, NUM_CLASSES, batch_of, make_step, reference_logits, setup


DEFAULT = ("cutout", "cutmix", "cutmix_pick_s")
SCHEMES = [a if a in DEFAULT else pytest.param(a, marks=pytest.mark.slow) for a in augment.PAPER_SCHEMES]


@pytest.mark.parametrize("aug", SCHEMES)
def test_mlkd_takes_x_as_its_weak_view_and_x_aug_as_its_strong_view(aug):
    # the reference's student scoring pass is the 'kld' criterion's (test_train_steps_logit.reference_logits)
    s = setup(aug, criterion="kld" if aug == "cutmix_pick_s" else "entropy")
    d = distillers.create("mlkd")
    w = distillers.resolve_weights(d, aug)
    assert (w["gamma"], w["alpha"]) == (0.1, 0.9)
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"], lw_mix=LW_MIX)
    key = jax.random.key(1)
    new_state, metrics = make_step(s, weights, d)(s["state"], s["tvars"], batch_of(s), key)

    ls, lsa, lt, lta, aux = reference_logits(s, key)
    labels = s["labels"]
    soft = transforms.mixed_targets(aux, labels, NUM_CLASSES, lsa.shape[0])
    ce, ce_aug = losses.cross_entropy(ls, labels), optax.softmax_cross_entropy(lsa, soft).mean()
    weak, strong = logit.mlkd_weak_loss(ls, lt, 4.0), logit.mlkd_strong_loss(lsa, lta, 4.0)
    want = w["gamma"] * (float(ce) + float(ce_aug)) + w["alpha"] * (LW_MIX[0] * float(weak) + LW_MIX[2] * float(strong))
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["logit"]) == pytest.approx(float(weak), rel=1e-5)
    assert float(metrics["logit_aug"]) == pytest.approx(float(strong), rel=1e-5)
    assert float(metrics["ce_aug"]) == pytest.approx(float(ce_aug), rel=1e-5)
    assert new_state["extra"] == {}
    # the views swapped (weak terms on x') is another number
    swapped = logit.mlkd_weak_loss(lsa, lta, 4.0) * LW_MIX[2] + logit.mlkd_strong_loss(ls, lt, 4.0) * LW_MIX[0]
    assert abs(float(swapped) - LW_MIX[0] * float(weak) - LW_MIX[2] * float(strong)) > 1e-3 * float(weak)

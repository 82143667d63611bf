"""NKD and WTTM composed with the schemes in the KD step: the step's loss is gamma*CE + alpha*(lw1*L(s(x), t(x))
+ lw3*L(s(x'), t(x'))) with L the pure loss (checked against the official code in
test_distiller_fixtures_nkd_wttm.py), NKD reading each mixed image's dominant label on x' (the official loss takes
the arg-max of a soft label)."""
import jax
import numpy as np
import pytest

from kdjax import distillers, losses
from kdjax.distillers import logit
from kdjax.train import steps
from test_train_steps_logit import LW_MIX, batch_of, dominant_labels, make_step, reference_logits, setup


@pytest.mark.parametrize("name,aug", [("nkd", "cutmix"), ("wttm", "cutmix_pick_t")])
def test_nkd_and_wttm_replace_the_kl_terms_on_x_and_x_aug(name, aug):
    s = setup(aug)
    d = distillers.create(name)
    w = distillers.resolve_weights(d, aug)
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"], lw_mix=LW_MIX)
    key = jax.random.key(1)
    _, metrics = make_step(s, weights, d)(s["state"], s["tvars"], batch_of(s), key)

    ls, lsa, lt, lta, aux = reference_logits(s, key)
    labels = s["labels"]
    if name == "nkd":
        labels_aug = dominant_labels(aux, labels, lsa.shape[0])
        assert not np.array_equal(np.asarray(labels_aug), np.asarray(labels))  # CutMix moved some labels
        term_x = logit.nkd_loss(ls, lt, labels, 3.0, 3.5)
        term_aug = logit.nkd_loss(lsa, lta, labels_aug, 3.0, 3.5)
        wrong_aug = logit.nkd_loss(lsa, lta, labels, 3.0, 3.5)  # x' scored against the un-mixed labels
        # ten times the tolerance below, so that the wrong labels would fail it
        assert abs(float(wrong_aug) - float(term_aug)) > 1e-4 * abs(float(term_aug))
    else:
        term_x, term_aug = logit.wttm_loss(ls, lt, 0.2), logit.wttm_loss(lsa, lta, 0.2)
    ce = losses.cross_entropy(ls, labels)
    want = w["gamma"] * float(ce) + w["alpha"] * (LW_MIX[0] * float(term_x) + LW_MIX[2] * float(term_aug))
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["logit"]) == pytest.approx(float(term_x), rel=1e-5)
    assert float(metrics["logit_aug"]) == pytest.approx(float(term_aug), rel=1e-5)
    assert "kl" not in metrics

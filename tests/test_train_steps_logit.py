"""The KD step with a logit distiller (DKD, DIST) and with logit standardisation: the step's loss and update against
a total written by hand from the pure losses of kdjax.distillers.logit (themselves checked against the official code
in test_distiller_fixtures.py) on the logits of separate passes.

What is pinned: a logit distiller replaces KL_T on x and on x' (``lw_mix`` weights, CE kept, on x' a mixed image's
dominant label); DKD's warm-up follows the global step through ``steps_per_epoch``; logit standardisation changes
the logit terms only (the CE term and the CutMixPick 'kld' score keep the raw logits and ``temperature``)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import load_config
from kdjax import augment, distillers, losses
from kdjax.augment import transforms
from kdjax.distillers import logit
from kdjax.tasks import distill
from kdjax.train import kd
from kdjax.train import steps

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NUM_CLASSES, SIZE, BATCH, LR = 6, 8, 8, 0.1
STEPS_PER_EPOCH = 10
LW_MIX = (0.7, 0.0, 1.3)  # unequal, so that a term weighted by the wrong lw shows


def kd_weights(config):
    return kd.KDMethod.from_config(config).weights


def make_distiller(config):
    return kd.KDMethod.from_config(config).distiller


def setup(aug, criterion="entropy"):
    student = tiny_models.TinyCNN(NUM_CLASSES, SIZE)
    teacher = tiny_models.TinyCNN(NUM_CLASSES, SIZE)
    x0 = jnp.zeros((2, SIZE, SIZE, 3))
    svars = jax.jit(student.init)(jax.random.key(1), x0)
    tvars = jax.jit(teacher.init)(jax.random.key(2), x0)
    tvars = {"params": tvars["params"], "batch_stats": jax.tree.map(lambda a: a + 0.3, tvars["batch_stats"])}
    images = jax.random.randint(jax.random.key(3), (BATCH, SIZE, SIZE, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.asarray([0, 1, 2, 3, 4, 5, 1, 3], jnp.int32)
    tx = optax.sgd(LR)
    state = {"params": svars["params"], "batch_stats": svars["batch_stats"], "opt_state": tx.init(svars["params"]),
             "step": jnp.asarray(25, jnp.int32), "extra": {}}  # step 25 of 10 per epoch: epoch 3
    stats = augment.DatasetStats(mean=MEAN, std=STD, image_size=SIZE, num_classes=NUM_CLASSES)
    scheme = augment.create(aug, dataset_stats=stats, n_pick=BATCH, criterion=criterion)

    def prepare(key, images_uint8):  # no random crop, so the reference sees the same x
        del key
        return transforms.normalize(images_uint8, MEAN, STD)
    return dict(student=student, teacher=teacher, svars=svars, tvars=tvars, images=images, labels=labels, tx=tx,
                state=state, scheme=scheme, prepare=prepare)


def reference_logits(s, key):
    """Logits of the original's separate passes: s(x) (train mode), [the student's scoring pass over the pool],
    s(x') with the statistics carried on; t(x), t(x') in inference mode; and the scheme's aux."""
    student, teacher, svars, tvars, labels = s["student"], s["teacher"], s["svars"], s["tvars"], s["labels"]
    scheme, k_aug = s["scheme"], jax.random.split(key)[1]

    @jax.jit
    def run(images):
        x = s["prepare"](None, images)
        ls, upd = student.apply(svars, x, train=True, mutable=["batch_stats"])
        if scheme.scored_by == "student":  # criterion 'kld': KL_T at the raw logits and T = 4
            def score_fn(pool):
                lp, pool_upd = student.apply({"params": svars["params"], **upd}, pool, train=True,
                                             mutable=["batch_stats"])
                return losses.kd_kl_per_sample(lp, teacher.apply(tvars, pool), 4.0), pool_upd["batch_stats"]
        elif scheme.scored_by == "teacher":
            def score_fn(pool):
                return augment.entropy(teacher.apply(tvars, pool)), None
        else:
            score_fn = None
        x_aug, aux = scheme(k_aug, x, labels, score_fn)
        stats = aux["score_state"] if scheme.scored_by == "student" else upd["batch_stats"]
        lsa, _ = student.apply({"params": svars["params"], "batch_stats": stats}, x_aug, train=True,
                               mutable=["batch_stats"])
        return ls, lsa, teacher.apply(tvars, x), teacher.apply(tvars, x_aug), aux
    return run(s["images"])


def grads_of(s, key, term, gamma, alpha, labels_aug):
    """The gradient of gamma*CE + alpha*(lw1*term(x) + lw3*term(x')) through the reference passes, for a scheme
    whose x' does not depend on the student."""
    student, svars, labels = s["student"], s["svars"], s["labels"]
    x = s["prepare"](None, s["images"])
    _, _, lt, lta, _ = reference_logits(s, key)
    x_aug, _ = jax.jit(lambda k: s["scheme"](k, x, labels, None))(jax.random.split(key)[1])

    def total(params):
        ls, upd = student.apply({"params": params, "batch_stats": svars["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
        lsa, _ = student.apply({"params": params, **upd}, x_aug, train=True, mutable=["batch_stats"])
        return gamma * losses.cross_entropy(ls, labels) + alpha * (LW_MIX[0] * term(ls, lt, labels)
                                                                   + LW_MIX[2] * term(lsa, lta, labels_aug))
    return jax.jit(jax.grad(total))(svars["params"])


def make_step(s, weights, distiller):
    return jax.jit(steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], weights,
                                      NUM_CLASSES, distiller=distiller, steps_per_epoch=STEPS_PER_EPOCH))


def batch_of(s):
    return {"images": s["images"], "labels": s["labels"]}


def dominant_labels(aux, labels, rows):
    return jnp.argmax(transforms.mixed_targets(aux, labels, NUM_CLASSES, rows), axis=-1)


@pytest.mark.parametrize("name,aug", [("dkd", "cutmix"), ("dist", "cutmix_pick_t")])
def test_logit_distiller_replaces_the_kl_terms(name, aug):
    """loss = gamma*CE + alpha*(lw1*L(s(x), t(x)) + lw3*L(s(x'), t(x'))) with L the pure loss; no KL term left."""
    s = setup(aug)
    d = distillers.create(name)
    w = distillers.resolve_weights(d, aug)
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"], lw_mix=LW_MIX)
    key = jax.random.key(1)  # CutMix keeps 7/16 of the image: the pasted one's label dominates
    new_state, metrics = make_step(s, weights, d)(s["state"], s["tvars"], batch_of(s), key)

    ls, lsa, lt, lta, aux = reference_logits(s, key)
    labels = s["labels"]
    if name == "dkd":  # epoch 3 of a 20-epoch warm-up
        labels_aug = dominant_labels(aux, labels, lsa.shape[0])
        assert not np.array_equal(np.asarray(labels_aug), np.asarray(labels))  # CutMix moved some labels
        term_x = 3 / 20 * logit.dkd_loss(ls, lt, labels, 1.0, 8.0, 4.0)
        term_aug = 3 / 20 * logit.dkd_loss(lsa, lta, labels_aug, 1.0, 8.0, 4.0)
    else:
        term_x, term_aug = logit.dist_loss(ls, lt, 1.0, 1.0, 4.0), logit.dist_loss(lsa, lta, 1.0, 1.0, 4.0)
    ce = losses.cross_entropy(ls, labels)
    want = w["gamma"] * float(ce) + w["alpha"] * (LW_MIX[0] * float(term_x) + LW_MIX[2] * float(term_aug))
    assert (w["gamma"], w["alpha"]) == ((1.0, 1.0) if name == "dkd" else (1.0, 2.0))
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["logit"]) == pytest.approx(float(term_x), rel=1e-5)
    assert float(metrics["logit_aug"]) == pytest.approx(float(term_aug), rel=1e-5)
    assert "kl" not in metrics and "distill" not in metrics and new_state["extra"] == {}
    with_kl = w["gamma"] * float(ce) + w["alpha"] * (LW_MIX[0] * float(losses.kd_kl(ls, lt))
                                                     + LW_MIX[2] * float(losses.kd_kl(lsa, lta)))
    assert abs(with_kl - want) > 1e-3 * abs(want)  # the replaced total is a different number

    # the update is the gradient of that total (only cutmix: its x' does not depend on the student)
    if aug == "cutmix":
        def term(z_s, z_t, y):
            return 3 / 20 * logit.dkd_loss(z_s, z_t, y, 1.0, 8.0, 4.0)
        g = grads_of(s, key, term, w["gamma"], w["alpha"], labels_aug)
        want_params = jax.tree.map(lambda p, g: p - LR * g, s["svars"]["params"], g)
        for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_dkd_warmup_follows_the_global_step():
    """min(epoch / warmup, 1) with epoch = step // steps_per_epoch + 1; warmup 0 switches it off."""
    s = setup("identity")
    weights = steps.KDWeights(gamma=1.0, alpha=1.0)
    step = make_step(s, weights, distillers.create("dkd", warmup=4))
    plain = make_step(s, weights, distillers.create("dkd", warmup=0))
    key = jax.random.key(0)
    full = float(plain(s["state"], s["tvars"], batch_of(s), key)[1]["logit"])
    for global_step, factor in ((0, 0.25), (9, 0.25), (10, 0.5), (25, 0.75), (30, 1.0), (1000, 1.0)):
        state = dict(s["state"], step=jnp.asarray(global_step, jnp.int32))
        got = float(step(state, s["tvars"], batch_of(s), key)[1]["logit"])
        assert got == pytest.approx(factor * full, rel=1e-6), global_step
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], weights, NUM_CLASSES,
                           distiller=distillers.create("dkd"))
    with pytest.raises(ValueError, match="distiller=dkd distils the teacher's logits and needs a teacher"):
        steps.make_kd_step(s["student"], None, s["tx"], s["prepare"], s["scheme"], weights, NUM_CLASSES,
                           distiller=distillers.create("dkd"), steps_per_epoch=10)


def test_logit_stand_changes_only_the_logit_terms():
    """Under CutMixPick by the 'kld' criterion (which reads T): with logit_stand the KD terms are KL on z-scored
    logits at the base temperature, while CE and the picked x' are those of the run without it."""
    s = setup("cutmix_pick_s", criterion="kld")
    d = distillers.create("kd")
    key = jax.random.key(5)
    ls_t = 0.5  # far from T = 4: a score computed at this temperature would pick other images
    w = distillers.resolve_weights(d, "cutmix_pick_s", logit_stand=True)
    assert (w["gamma"], w["alpha"]) == (0.1, 9.0)
    on = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], lw_mix=LW_MIX, logit_stand=True, ls_temperature=ls_t)
    off = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], lw_mix=LW_MIX)
    _, m_on = make_step(s, on, d)(s["state"], s["tvars"], batch_of(s), key)
    _, m_off = make_step(s, off, d)(s["state"], s["tvars"], batch_of(s), key)

    ls, lsa, lt, lta, _ = reference_logits(s, key)  # x' picked by KL at T = 4 on the raw logits
    std = distillers.standardize
    ce = float(losses.cross_entropy(ls, s["labels"]))
    on_x, on_aug = float(losses.kd_kl(std(ls), std(lt), ls_t)), float(losses.kd_kl(std(lsa), std(lta), ls_t))
    off_x, off_aug = float(losses.kd_kl(ls, lt, 4.0)), float(losses.kd_kl(lsa, lta, 4.0))
    assert float(m_on["ce"]) == float(m_off["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(m_off["kl_aug"]) == pytest.approx(off_aug, rel=1e-5)
    assert float(m_on["kl"]) == pytest.approx(on_x, rel=1e-5)
    assert float(m_on["kl_aug"]) == pytest.approx(on_aug, rel=1e-5)  # the same x' as without LS
    want = w["gamma"] * ce + w["alpha"] * (LW_MIX[0] * on_x + LW_MIX[2] * on_aug)
    assert float(m_on["loss"]) == pytest.approx(want, rel=1e-5)
    assert abs(on_x - off_x) > 1e-3 * abs(off_x)
    # the step's term is the official LS-KD (ls_kd_loss, fixture-checked)
    assert on_x == pytest.approx(float(logit.ls_kd_loss(ls, lt, ls_t)), rel=1e-5)


def test_logit_stand_of_dkd_is_the_official_ls_dkd():
    """The dkd term with logit_stand: DKD on z-scored logits at the base temperature (warm-up included), which
    with the LS weight 9 is the LS code's DKD with alpha x 9 and beta x 9."""
    rng = np.random.default_rng(0)
    z_s, z_t = (jnp.asarray(rng.normal(size=(8, 6)) * 3, jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.integers(0, 6, 8), jnp.int32)
    weights = steps.KDWeights(logit_stand=True)
    term = jax.jit(steps.logit_term(weights, distillers.create("dkd", warmup=20)))
    got = float(term(z_s, z_t, y, 5))
    std = distillers.standardize
    assert got == pytest.approx(5 / 20 * float(logit.dkd_loss(std(z_s), std(z_t), y, 1.0, 8.0, 2.0)), rel=1e-6)
    official = logit.dkd_loss(z_s, z_t, y, 9.0, 72.0, 2.0, logit_stand=True)
    assert distillers.LS_WEIGHT * got == pytest.approx(5 / 20 * float(official), rel=1e-6)
    plain = float(jax.jit(steps.logit_term(steps.KDWeights(), distillers.create("dkd", warmup=20)))(z_s, z_t, y, 5))
    assert plain == pytest.approx(5 / 20 * float(logit.dkd_loss(z_s, z_t, y, 1.0, 8.0, 4.0)), rel=1e-6)


def test_logit_stand_refused_where_it_does_not_apply():
    s = setup("identity")
    on = steps.KDWeights(logit_stand=True)
    for name in ("dist", "crd", "at"):
        with pytest.raises(ValueError, match=f"not distiller={name}"):
            steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], on, NUM_CLASSES,
                               distiller=distillers.create(name), steps_per_epoch=10)
    with pytest.raises(ValueError, match="loss.logit_stand standardises the teacher's logits and needs a teacher"):
        steps.make_kd_step(s["student"], None, s["tx"], s["prepare"], s["scheme"], on, NUM_CLASSES)


def config_of(arg, **loss):
    config = load_config("distill", "teacher=tiny_cnn,student=tiny_cnn,dataset=digits,image_size=8," + arg)
    config.teacher_checkpoint = "t"
    for k, v in loss.items():
        config.loss[k] = v
    return config


def test_config_weights_of_logit_distillers_and_logit_stand():
    weights = lambda c: (lambda w: (w.gamma, w.alpha, w.beta, w.logit_stand, w.ls_temperature))(  # noqa: E731
        kd_weights(c))
    assert weights(config_of("distiller=dkd,aug=identity")) == (1.0, 1.0, 0.0, False, 2.0)
    assert weights(config_of("distiller=dist,aug=cutmix")) == (1.0, 2.0, 0.0, False, 2.0)
    assert weights(config_of("distiller=kd,aug=cutmix", logit_stand=True)) == (0.1, 9.0, 0.0, True, 2.0)
    assert weights(config_of("distiller=dkd,aug=cutmix", logit_stand=True, alpha=4.0)) == (1.0, 4.0, 0.0, True, 2.0)
    config = config_of("distiller=dkd,aug=cutmix")
    config.distill.warmup, config.distill.dkd_beta = 5, 2.0
    assert make_distiller(config) == distillers.create("dkd", warmup=5, dkd_beta=2.0)
    config = config_of("distiller=correlation,aug=cutmix")
    kd.validate(config)
    assert config.distiller == "cc"  # the canonical name is what the workdir and the results record
    with pytest.raises(ValueError, match="standardises the logits of kd and dkd, not distiller=dist"):
        kd.validate(config_of("distiller=dist,aug=cutmix", logit_stand=True))

"""The KD step with a feature distiller (CRD, FitNet): its loss against a hand-computed total of separate passes,
its gradients (student and heads only, heads weight-decayed), the config weights and errors, and an end-to-end
CRD run on digits that learns and resumes its heads and memory banks exactly."""
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import load_config
from kdjax import augment, distillers
from kdjax.augment import transforms
from kdjax.tasks import distill
from kdjax.train import kd
from kdjax.train import recipe, steps

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NUM_CLASSES, SIZE, BATCH, NUM_TRAIN = 4, 8, 8, 24
LR, WD = 0.1, 5e-4


def kd_weights(config):
    return kd.KDMethod.from_config(config).weights


def make_distiller(config):
    return kd.KDMethod.from_config(config).distiller


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd_loss(ls, lsa, lt, lta, y, gamma, alpha, T=4.0):
    """gamma CE(s(x), y) + alpha (KL_T(s(x)||t(x)) + KL_T(s(x')||t(x'))), each KL batch-mean x T^2."""
    ls, lsa, lt, lta = (np.asarray(a, np.float64) for a in (ls, lsa, lt, lta))
    ce = -np_log_softmax(ls)[np.arange(len(y)), np.asarray(y)].mean()

    def kl(s, t):
        lp, lq = np_log_softmax(t / T), np_log_softmax(s / T)
        return (np.exp(lp) * (lp - lq)).sum(-1).mean() * T * T

    return gamma * ce + alpha * (kl(ls, lt) + kl(lsa, lta))


def setup(aug, distiller):
    """Tiny student/teacher, a batch with its dataset indices, and a state whose extra holds the distiller's."""
    student = tiny_models.TinyCNN(NUM_CLASSES, SIZE)
    teacher = tiny_models.TinyCNN(NUM_CLASSES, SIZE)
    x0 = jnp.zeros((2, SIZE, SIZE, 3))
    svars = jax.jit(student.init)(jax.random.key(1), x0)  # jitted set-up: one compile instead of one per op
    tvars = jax.jit(teacher.init)(jax.random.key(2), x0)
    tvars = {"params": tvars["params"], "batch_stats": jax.tree.map(lambda a: a + 0.3, tvars["batch_stats"])}
    train_labels = np.arange(NUM_TRAIN) % NUM_CLASSES
    indices = jnp.asarray([3, 17, 5, 0, 22, 9, 12, 14], jnp.int32)
    labels = jnp.asarray(train_labels[np.asarray(indices)], jnp.int32)
    images = jax.random.randint(jax.random.key(3), (BATCH, SIZE, SIZE, 3), 0, 256).astype(jnp.uint8)
    tx, _ = recipe.make_optimizer(LR, steps_per_epoch=10, decay_epochs=(), momentum=0.9, weight_decay=WD)
    feats_s = jax.eval_shape(lambda x: student.apply(svars, x, features=True)[0],
                             jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32))
    feats_t = jax.eval_shape(lambda x: teacher.apply(tvars, x, features=True)[0],
                             jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32))
    extra = jax.jit(lambda k: distillers.make_extra(distiller, tx, k, feats_s, feats_t, num_train=NUM_TRAIN,
                                                         train_labels=train_labels))(jax.random.key(4))
    state = {"params": svars["params"], "batch_stats": svars["batch_stats"], "opt_state": tx.init(svars["params"]),
             "step": jnp.zeros((), jnp.int32), "extra": extra}
    stats = augment.DatasetStats(mean=MEAN, std=STD, image_size=SIZE, num_classes=NUM_CLASSES)
    scheme = augment.create(aug, dataset_stats=stats, n_pick=BATCH)
    w = distillers.resolve_weights(distiller, aug)
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"])

    def prepare(key, images_uint8):  # no random crop, so the reference sees the same x
        del key
        return transforms.normalize(images_uint8, MEAN, STD)
    return dict(student=student, teacher=teacher, svars=svars, tvars=tvars, images=images, labels=labels,
                indices=indices, tx=tx, state=state, scheme=scheme, weights=weights, prepare=prepare)


def batch_of(s, labels=None):
    return {"images": s["images"], "labels": s["labels"] if labels is None else labels, "indices": s["indices"]}


def sgd_first_step(p, g):
    """The first PyTorch-SGD step (momentum buffer = d) with coupled weight decay: p - lr (g + wd p)."""
    return jax.tree.map(lambda p, g: p - LR * (g + WD * p), p, g)


def assert_trees_close(got, want, rtol=2e-4, atol=2e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def test_crd_step_equals_separate_passes_and_updates_student_heads_and_banks():
    crd = distillers.create("crd", nce_k=64)  # 64 negatives from 18 other-class samples: drawn with replacement
    s = setup("cutmix_pick_t", crd)
    assert (s["weights"].gamma, s["weights"].alpha, s["weights"].beta) == (0.1, 0.9, 0.8)
    step = steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], s["weights"],
                              NUM_CLASSES, distiller=crd)
    key = jax.random.key(7)
    new_state, metrics = jax.jit(step)(s["state"], s["tvars"], batch_of(s), key)

    # reference: the original's separate passes; features of the original batch x from s(x) and t(x)
    student, teacher, svars, tvars, labels = s["student"], s["teacher"], s["svars"], s["tvars"], s["labels"]
    x = s["prepare"](None, s["images"])
    score_fn = lambda pool: (augment.entropy(teacher.apply(tvars, pool)), None)  # noqa: E731
    x_aug, _ = jax.jit(lambda k: s["scheme"](k, x, labels, score_fn))(jax.random.split(key)[1])
    feats_t, lt = teacher.apply(tvars, x, features=True)
    lta = teacher.apply(tvars, x_aug)
    extra = s["state"]["extra"]
    d_key = jax.random.fold_in(key, distillers.DISTILLER_KEY)

    def total(params, heads):
        (feats_s, ls), upd = student.apply({"params": params, "batch_stats": svars["batch_stats"]}, x, train=True,
                                           features=True, mutable=["batch_stats"])
        lsa, upd = student.apply({"params": params, **upd}, x_aug, train=True, mutable=["batch_stats"])
        term, d_state = crd.loss(heads, extra["state"], feats_s, feats_t, labels=labels, indices=s["indices"],
                                 key=d_key)
        kd = 0.1 * optax.softmax_cross_entropy_with_integer_labels(ls, labels).mean() \
            + 0.9 * 16.0 * (jnp.mean(jnp.sum(jax.nn.softmax(lt / 4) * (jax.nn.log_softmax(lt / 4)
                                                                      - jax.nn.log_softmax(ls / 4)), -1))
                            + jnp.mean(jnp.sum(jax.nn.softmax(lta / 4) * (jax.nn.log_softmax(lta / 4)
                                                                         - jax.nn.log_softmax(lsa / 4)), -1)))
        return kd + 0.8 * term, (ls, lsa, term, d_state, upd)

    (ref_total, (ls, lsa, term, ref_d_state, upd)), (g_s, g_h) = jax.jit(jax.value_and_grad(
        total, argnums=(0, 1), has_aux=True))(svars["params"], extra["params"])
    ref = np_kd_loss(ls, lsa, lt, lta, labels, 0.1, 0.9) + 0.8 * float(term)
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(float(ref_total), rel=1e-5)
    assert float(metrics["distill"]) == pytest.approx(float(term), rel=1e-5)

    # student and heads: one SGD step of the total's gradient, weight decay included, from one optimiser
    assert_trees_close(new_state["params"], sgd_first_step(svars["params"], g_s))
    assert_trees_close(new_state["extra"]["params"], sgd_first_step(extra["params"], g_h))
    assert_trees_close(new_state["batch_stats"], upd["batch_stats"])
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(new_state["extra"]["params"]), jax.tree.leaves(extra["params"]))]
    assert min(moved) > 1e-6  # every head leaf was trained

    # memory banks: the batch rows replaced, every other row untouched, Z fixed at the first call
    assert_trees_close(new_state["extra"]["state"], ref_d_state, rtol=1e-4, atol=1e-5)
    others = np.setdiff1d(np.arange(NUM_TRAIN), np.asarray(s["indices"]))
    for bank in ("memory_s", "memory_t"):
        np.testing.assert_array_equal(np.asarray(new_state["extra"]["state"][bank])[others],
                                      np.asarray(extra["state"][bank])[others])
        assert not np.allclose(np.asarray(new_state["extra"]["state"][bank])[np.asarray(s["indices"])],
                               np.asarray(extra["state"][bank])[np.asarray(s["indices"])])
    assert float(new_state["extra"]["state"]["z_s"]) > 0 and float(new_state["extra"]["state"]["z_t"]) > 0

    # the teacher is data: the loss has no gradient with respect to any of its variables
    t_grads = jax.jit(jax.grad(lambda tv: step(s["state"], tv, batch_of(s, labels), key)[1]["loss"]))(
        tvars)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(t_grads))


def test_hint_step_with_student_scoring_keeps_the_pass_order():
    """FitNet (hint_layer 0) under CutMixPick by the student: s(x) with features, the scoring pass, s(x')."""
    hint = distillers.create("hint", hint_layer=0)
    s = setup("cutmix_pick_s", hint)
    step = steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], s["weights"],
                              NUM_CLASSES, distiller=hint)
    key = jax.random.key(11)
    new_state, metrics = jax.jit(step)(s["state"], s["tvars"], batch_of(s), key)

    student, teacher, svars, tvars, labels = s["student"], s["teacher"], s["svars"], s["tvars"], s["labels"]
    extra = s["state"]["extra"]

    @jax.jit
    def reference(images):
        x = s["prepare"](None, images)
        (feats_s, ls), upd = student.apply(svars, x, train=True, features=True, mutable=["batch_stats"])

        def score_fn(pool):
            logits, pool_upd = student.apply({"params": svars["params"], **upd}, pool, train=True,
                                             mutable=["batch_stats"])
            return augment.entropy(logits), pool_upd["batch_stats"]
        x_aug, aux = s["scheme"](jax.random.split(key)[1], x, labels, score_fn)
        lsa, upd = student.apply({"params": svars["params"], "batch_stats": aux["score_state"]}, x_aug,
                                 train=True, mutable=["batch_stats"])
        feats_t, lt = teacher.apply(tvars, x, features=True)
        lta = teacher.apply(tvars, x_aug)
        term, d_state = hint.loss(extra["params"], extra["state"], feats_s, feats_t)
        # FitNet by hand as well: ConvReg(f_s[0]) (train-mode BN) against f_t[0]
        out, _ = hint.module(feats_s, feats_t).apply(
            {"params": extra["params"]["conv_reg"], "batch_stats": extra["state"]["batch_stats"]["conv_reg"]},
            feats_s[0], train=True, mutable=["batch_stats"])
        return ls, lsa, lt, lta, term, d_state, upd, out, feats_t[0]

    ls, lsa, lt, lta, term, d_state, upd, out, ft0 = reference(s["images"])
    assert float(term) == pytest.approx(float(np.mean((np.asarray(out, np.float64)
                                                       - np.asarray(ft0, np.float64)) ** 2)), rel=1e-5)
    w = s["weights"]
    assert (w.gamma, w.alpha, w.beta) == (0.1, 0.9, 100.0)
    ref = np_kd_loss(ls, lsa, lt, lta, labels, w.gamma, w.alpha) + w.beta * float(term)
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-5)
    assert_trees_close(new_state["batch_stats"], upd["batch_stats"])
    assert_trees_close(new_state["extra"]["state"], d_state)  # the regressor's BN running statistics
    assert jax.tree.structure(new_state["extra"]["opt_state"]) == jax.tree.structure(extra["opt_state"])


# ~15 s each (a resnet8 step compiles): CC, the one with heads, in the default suite; NST and KD-SVD, which share
# its wiring, behind slow (tests/tasks/test_distillers_learn.py trains all three in the default suite).
@pytest.mark.parametrize("name", [pytest.param("nst", marks=pytest.mark.slow),
                                  pytest.param("kdsvd", marks=pytest.mark.slow), "cc"])
def test_relational_distillers_compose_with_kd(name):
    """NST, KD-SVD and CC in the KD step (resnet8 pair: they read f[1:-1], which tiny_cnn lacks) under flip:
    loss = the KD loss of the separate passes + beta * the distiller's term on s(x), t(x); CC's heads train."""
    from kdjax import models
    student, teacher = models.create("resnet8", NUM_CLASSES, SIZE), models.create("resnet8", NUM_CLASSES, SIZE)
    x0 = jnp.zeros((2, SIZE, SIZE, 3))
    svars = jax.jit(student.init)(jax.random.key(1), x0)
    tvars = jax.jit(teacher.init)(jax.random.key(2), x0)
    d = distillers.create(name)
    images = jax.random.randint(jax.random.key(3), (BATCH, SIZE, SIZE, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(BATCH, dtype=jnp.int32) % NUM_CLASSES
    tx, _ = recipe.make_optimizer(LR, steps_per_epoch=10, decay_epochs=(), momentum=0.9, weight_decay=WD)
    shape = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
    feats_s = jax.eval_shape(lambda x: student.apply(svars, x, features=True)[0], shape)
    feats_t = jax.eval_shape(lambda x: teacher.apply(tvars, x, features=True)[0], shape)
    extra = distillers.make_extra(d, tx, jax.random.key(4), feats_s, feats_t)
    state = {"params": svars["params"], "batch_stats": svars["batch_stats"], "opt_state": tx.init(svars["params"]),
             "step": jnp.zeros((), jnp.int32), "extra": extra}
    stats = augment.DatasetStats(mean=MEAN, std=STD, image_size=SIZE, num_classes=NUM_CLASSES)
    scheme = augment.create("flip", dataset_stats=stats)
    w = distillers.resolve_weights(d, "flip")
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"])
    prepare = lambda key, im: transforms.normalize(im, MEAN, STD)  # noqa: E731
    step = steps.make_kd_step(student, teacher, tx, prepare, scheme, weights, NUM_CLASSES, distiller=d,
                              steps_per_epoch=10)
    key = jax.random.key(7)
    new_state, metrics = jax.jit(step)(state, tvars, {"images": images, "labels": labels}, key)

    @jax.jit
    def reference(images):
        x = prepare(None, images)
        x_aug, _ = scheme(jax.random.split(key)[1], x, labels)
        (fs, ls), upd = student.apply(svars, x, train=True, features=True, mutable=["batch_stats"])
        lsa, _ = student.apply({"params": svars["params"], **upd}, x_aug, train=True, mutable=["batch_stats"])
        ft, lt = teacher.apply(tvars, x, features=True)
        term, _ = d.loss(extra.get("params", {}), extra.get("state", {}), fs, ft)
        return ls, lsa, lt, teacher.apply(tvars, x_aug), term

    ls, lsa, lt, lta, term = reference(images)
    assert float(term) > 0
    ref = np_kd_loss(ls, lsa, lt, lta, labels, w["gamma"], w["alpha"]) + w["beta"] * float(term)
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-5)
    assert float(metrics["distill"]) == pytest.approx(float(term), rel=1e-5)
    if name == "cc":  # the two embedding heads are optimised with the student
        moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_state["extra"]["params"]),
                                                             jax.tree.leaves(extra["params"]))]
        assert min(moved) > 0
    else:
        assert extra["params"] == {} and extra["state"] == {}


def test_kd_distiller_is_the_plain_kd_program():
    """distiller=kd traces to exactly the program without a distiller: no feature outputs, no extra state."""
    s = setup("cutmix", distillers.create("kd"))
    assert s["state"]["extra"] == {}
    programs = []
    for d in (None, distillers.create("kd")):
        step = steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], s["weights"],
                                  NUM_CLASSES, distiller=d)
        programs.append(str(jax.make_jaxpr(step)(s["state"], s["tvars"], batch_of(s),
                                                 jax.random.key(0))))
    assert programs[0] == programs[1]
    crd_step = steps.make_kd_step(s["student"], s["teacher"], s["tx"], s["prepare"], s["scheme"], s["weights"],
                                  NUM_CLASSES, distiller=distillers.create("crd", nce_k=8))
    with pytest.raises(ValueError, match="needs the batch's dataset indices"):
        crd_step(s["state"], s["tvars"], {"images": s["images"], "labels": s["labels"]}, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a teacher"):
        steps.make_kd_step(s["student"], None, s["tx"], s["prepare"], s["scheme"], s["weights"], NUM_CLASSES,
                           distiller=distillers.create("at"))


def distill_config(aug="cutmix_pick_t", distiller="crd", teacher_dir="", **fields):
    config = load_config("distill", f"teacher=tiny_cnn,student=tiny_cnn,dataset=digits,aug={aug},"
                                    f"distiller={distiller},image_size=8,batch_size=32,steps_per_dispatch=64,"
                                    "last_batch=drop")
    config.teacher_checkpoint = str(teacher_dir)
    for key, value in fields.items():
        config[key] = value
    return config


def test_config_weights_options_and_errors():
    weights = lambda config: (lambda w: (w.gamma, w.alpha, w.beta))(kd_weights(config))  # noqa: E731
    assert weights(distill_config("identity")) == (1.0, 0.0, 0.8)      # CRD alone: the original's
    assert weights(distill_config("cutmix")) == (0.1, 0.9, 0.8)        # with a scheme: the paper's KD weights
    assert weights(distill_config("identity", "kd")) == (0.1, 0.9, 0.0)
    config = distill_config("identity")
    config.distill.with_kd = True                                       # CRD+KD
    assert weights(config) == (1.0, 1.0, 0.8)
    config.loss.beta = 2.0
    assert weights(config) == (1.0, 1.0, 2.0)                           # an explicit weight wins
    config.distill.nce_k = 100
    assert make_distiller(config).nce_k == 100

    with pytest.raises(ValueError, match="unknown distiller 'crdd'; valid distillers: ab, at, cc, crd, dist, dkd, fsp, ft, hint"):
        kd.validate(distill_config(distiller="crdd", teacher_dir="t"))
    config = distill_config(teacher_dir="t")
    config.distill.hint_layer = 1
    with pytest.raises(ValueError, match="unknown option.*hint_layer for distiller 'crd'; valid options"):
        kd.validate(config)
    with pytest.raises(ValueError, match="distiller=crd distils a teacher's features"):
        kd.validate(distill_config("cutmix", teacher="none"))


def _restore(step_dir):
    return jax.device_get(ocp.StandardCheckpointer().restore(str(pathlib.Path(step_dir) / "state")))


def test_crd_run_learns_and_resumes_heads_and_banks_exactly(tmp_path):
    """tiny_cnn teacher (1 epoch, ~45% top-1), then CRD + CutMixPick(teacher) for 2 epochs with a checkpoint per
    epoch; the default 16,384 negatives exceed the ~1,300 other-class digits, so they are drawn with replacement.
    Deleting the last checkpoint and rerunning resumes from epoch 1 and must reproduce the final state bit for bit."""
    # Optimised XLA for this test alone: the two runs execute ~250 steps, which unfused run ~10x slower.
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        run_and_resume(tmp_path)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def run_and_resume(tmp_path):
    from kdjax.tasks import teacher
    tconfig = load_config("teacher", "model=tiny_cnn,dataset=digits,epochs=1,image_size=8,batch_size=32,"
                                     "steps_per_dispatch=64,last_batch=drop")
    tconfig.optim.lr = 0.1
    teacher.run(tconfig, str(tmp_path / "teacher"))

    workdir = tmp_path / "crd"
    config = distill_config(teacher_dir=tmp_path / "teacher", epochs=2, checkpoint_every=1, keep_checkpoints=3)
    config.optim.lr = 0.1
    results = distill.run(config, str(workdir))
    assert results["distiller"] == "crd" and results["loss_weights"] == {"gamma": 0.1, "alpha": 0.9, "beta": 0.8}
    assert results["top1"] > 0.3  # 10 classes: chance is 0.1

    ckpts = workdir / "checkpoints"
    steps_done = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert len(steps_done) == 2
    first, final = (_restore(ckpts / str(n)) for n in steps_done)
    changed = lambda a, b: any(not np.array_equal(u, v)  # noqa: E731
                               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    for part in ("params", "opt_state", "state"):  # epoch 2 trained the heads and updated the banks
        assert changed(first["extra"][part], final["extra"][part])

    # As if killed during the last epoch: neither its checkpoint nor the finished run's results.json exist.
    shutil.rmtree(ckpts / str(steps_done[-1]))
    (workdir / "results.json").unlink()
    distill.run(config, str(workdir))
    resumed = _restore(ckpts / str(steps_done[-1]))
    assert jax.tree.structure(resumed) == jax.tree.structure(final)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

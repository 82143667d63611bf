"""kdjax.train.steps: the KD step against a hand-written NumPy loss of the original's passes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from kdjax import augment
from kdjax.augment import transforms
from kdjax.train import steps

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd_loss(ls, lsa, lt, lta, y, T=4.0, gamma=0.1, alpha=0.9):
    """The original's loss written out: 0.1 CE(s(x), y) + 0.9 (KL_T(s(x)||t(x)) + KL_T(s(x')||t(x'))), KL x T^2."""
    ce = -np_log_softmax(ls)[np.arange(len(y)), y].mean()

    def kl(s, t):
        lp, lq = np_log_softmax(t / T), np_log_softmax(s / T)
        return (np.exp(lp) * (lp - lq)).sum(-1).mean() * T * T

    return gamma * ce + alpha * (kl(ls, lt) + kl(lsa, lta))


def _setup(aug="identity", num_classes=5, batch=8, size=8):
    student = tiny_models.TinyCNN(num_classes, size)
    teacher = tiny_models.TinyCNN(num_classes, size)
    x0 = jnp.zeros((2, size, size, 3))
    svars = student.init(jax.random.key(1), x0)
    tvars = teacher.init(jax.random.key(2), x0)
    # a teacher with non-trivial inference statistics
    tvars = {"params": tvars["params"], "batch_stats": jax.tree.map(lambda a: a + 0.3, tvars["batch_stats"])}
    images = jax.random.randint(jax.random.key(3), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(batch, dtype=jnp.int32) % num_classes
    tx = optax.sgd(0.1)
    state = {"params": svars["params"], "batch_stats": svars["batch_stats"], "opt_state": tx.init(svars["params"]),
             "step": jnp.zeros((), jnp.int32), "extra": {}}
    stats = augment.DatasetStats(mean=MEAN, std=STD, image_size=size, num_classes=num_classes) \
        if "num_classes" in augment.DatasetStats.__dataclass_fields__ else augment.DatasetStats(MEAN, STD, size)
    scheme = augment.create(aug, dataset_stats=stats, n_pick=batch)

    def prepare(key, images_uint8):  # no random crop, so the reference sees the same x
        del key
        return transforms.normalize(images_uint8, MEAN, STD)
    return student, teacher, svars, tvars, images, labels, tx, state, scheme, prepare


@pytest.mark.parametrize("aug", ["identity", "mixup"])
def test_kd_step_equals_numpy_loss_of_two_train_mode_passes(aug):
    student, teacher, svars, tvars, images, labels, tx, state, scheme, prepare = _setup(aug)
    step = steps.make_kd_step(student, teacher, tx, prepare, scheme, steps.KDWeights(), 5)
    key = jax.random.key(7)
    new_state, metrics = jax.jit(step)(state, tvars, {"images": images, "labels": labels}, key)

    # reference: the original's four separate passes, in its order
    x = prepare(None, images)
    x_aug, _ = scheme(jax.random.split(key)[1], x, labels)
    ls, upd = student.apply(svars, x, train=True, mutable=["batch_stats"])
    lsa, upd = student.apply({"params": svars["params"], **upd}, x_aug, train=True, mutable=["batch_stats"])
    lt, lta = teacher.apply(tvars, x), teacher.apply(tvars, x_aug)
    ref = np_kd_loss(*(np.asarray(a, np.float64) for a in (ls, lsa, lt, lta)), np.asarray(labels))
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-5)
    for got, want in zip(jax.tree.leaves(new_state["batch_stats"]), jax.tree.leaves(upd["batch_stats"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(new_state["step"]) == 1


def test_cutmix_pick_s_keeps_the_original_pass_order():
    """s(x), then the no-gradient train-mode pass over the pool (BN statistics updated), then s(x')."""
    student, teacher, svars, tvars, images, labels, tx, state, scheme, prepare = _setup("cutmix_pick_s")
    step = steps.make_kd_step(student, teacher, tx, prepare, scheme, steps.KDWeights(), 5)
    key = jax.random.key(11)
    new_state, metrics = jax.jit(step)(state, tvars, {"images": images, "labels": labels}, key)

    x = prepare(None, images)
    ls, upd = student.apply(svars, x, train=True, mutable=["batch_stats"])

    def score_fn(pool):
        logits, pool_upd = student.apply({"params": svars["params"], **upd}, pool, train=True,
                                         mutable=["batch_stats"])
        return augment.entropy(logits), pool_upd["batch_stats"]
    x_aug, aux = scheme(jax.random.split(key)[1], x, labels, score_fn)
    lsa, upd = student.apply({"params": svars["params"], "batch_stats": aux["score_state"]}, x_aug, train=True,
                             mutable=["batch_stats"])
    lt, lta = teacher.apply(tvars, x), teacher.apply(tvars, x_aug)
    ref = np_kd_loss(*(np.asarray(a, np.float64) for a in (ls, lsa, lt, lta)), np.asarray(labels))
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-5)
    for got, want in zip(jax.tree.leaves(new_state["batch_stats"]), jax.tree.leaves(upd["batch_stats"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_labels_only_student_uses_mixed_labels_on_x_aug():
    student, _, svars, _, images, labels, tx, state, scheme, prepare = _setup("mixup")
    step = steps.make_kd_step(student, None, tx, prepare, scheme, steps.KDWeights(), 5)
    key = jax.random.key(5)
    _, metrics = jax.jit(step)(state, None, {"images": images, "labels": labels}, key)
    x = prepare(None, images)
    x_aug, aux = scheme(jax.random.split(key)[1], x, labels)
    ls, upd = student.apply(svars, x, train=True, mutable=["batch_stats"])
    lsa, _ = student.apply({"params": svars["params"], **upd}, x_aug, train=True, mutable=["batch_stats"])
    y = np.asarray(labels)
    lam, perm = float(aux["lam"]), np.asarray(aux["perm"])
    lp, lpa = np_log_softmax(np.asarray(ls, np.float64)), np_log_softmax(np.asarray(lsa, np.float64))
    rows = np.arange(len(y))
    ce_aug = -(lam * lpa[rows, y] + (1 - lam) * lpa[rows, y[perm]]).mean()
    assert float(metrics["loss"]) == pytest.approx(-lp[rows, y].mean() + ce_aug, rel=1e-5)

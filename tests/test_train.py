"""Training: the optimiser recipe, the KD step against a hand-written NumPy loss, the epoch plan, and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from kdjax import augment
from kdjax.augment import base as base_transform
from kdjax.train import loop, optim, steps

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


def test_step_decay_schedule_is_per_epoch_with_strict_milestones():
    schedule = optim.step_decay_schedule(0.05, steps_per_epoch=3, decay_epochs=(2, 4), decay_rate=0.1)
    lrs = [float(schedule(c)) for c in range(15)]
    # epochs 1-2 (counts 0-5) at 0.05, epochs 3-4 at 0.005, from epoch 5 on 0.0005
    np.testing.assert_allclose(lrs, [0.05] * 6 + [0.005] * 6 + [0.0005] * 3, rtol=1e-6)


def test_paper_milestones_and_epoch_factor():
    assert optim.scaled_decay_epochs((150, 180, 210), 4) == (600, 720, 840)
    schedule = optim.step_decay_schedule(0.05, 782, (150, 180, 210))
    assert float(schedule(150 * 782 - 1)) == pytest.approx(0.05)  # last step of epoch 150
    assert float(schedule(150 * 782)) == pytest.approx(0.005)     # first step of epoch 151


def test_default_lr_rule_and_explicit_value_wins():
    assert optim.default_lr("resnet20", None) == 0.05
    assert optim.default_lr("ShuffleV2", None) == 0.01
    assert optim.default_lr("MobileNetV2", 0.2) == 0.2


def test_optimizer_matches_pytorch_sgd():
    """PyTorch SGD: d = g + wd p; buf = d (first step) then m buf + d; p -= lr buf; lr from the schedule."""
    A = np.array([[2.0, 0.3], [0.3, 1.0]], np.float32)
    tx, schedule = optim.make_optimizer(0.1, steps_per_epoch=2, decay_epochs=(1,), momentum=0.9, weight_decay=0.01)
    p = jnp.array([1.0, -2.0])
    state = tx.init(p)
    ref_p, buf = np.array([1.0, -2.0]), None
    for count in range(5):
        g = A @ np.asarray(p)
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
        d = A @ ref_p + 0.01 * ref_p
        buf = d if buf is None else 0.9 * buf + d
        ref_p = ref_p - (0.1 if count < 2 else 0.01) * buf
        np.testing.assert_allclose(np.asarray(p), ref_p, rtol=1e-5)


def test_plan_short_batch_and_divisibility():
    plan = loop.make_plan(50000, 64, 1, 100)
    assert (plan.full_steps, plan.short_batch, plan.steps_per_epoch) == (781, 16, 782)
    assert 781 % plan.chunk == 0 and plan.chunk == 71
    assert loop.make_plan(50000, 64, 1, 100, last_batch="drop").steps_per_epoch == 781
    assert loop.make_plan(100, 8, 8, 10).short_batch == 0  # 4 left over do not divide over 8 devices: dropped
    with pytest.raises(ValueError, match="does not divide over 8 devices"):
        loop.make_plan(1000, 60, 8, 10)
    with pytest.raises(ValueError, match="fewer than one batch"):
        loop.make_plan(10, 64, 1, 10)


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
        return base_transform.normalize(images_uint8, MEAN, STD)
    return student, teacher, svars, tvars, images, labels, tx, state, scheme, prepare


@pytest.mark.parametrize("aug", ["identity", "mixup"])
def test_kd_step_equals_numpy_loss_of_two_train_mode_passes(aug):
    student, teacher, svars, tvars, images, labels, tx, state, scheme, prepare = _setup(aug)
    step = steps.make_kd_step(student, teacher, tx, prepare, scheme, steps.KDWeights(), 5)
    key = jax.random.key(7)
    new_state, metrics = jax.jit(step)(state, tvars, images, labels, key)

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
    step = steps.make_kd_step(student, teacher, tx, prepare, scheme, steps.KDWeights(), 5, scorer="student")
    key = jax.random.key(11)
    new_state, metrics = jax.jit(step)(state, tvars, images, labels, key)

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
    _, metrics = jax.jit(step)(state, None, images, labels, key)
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

"""ReviewKD against its official PyTorch code (dvlab-research/ReviewKD, CIFAR-100/model/reviewkd.py: ABF, the
ReviewKD module, hcl; train.py: the warm-up), on tests/fixtures/distillers/reviewkd.npz written in float64 by
tests/fixtures/make_distiller_fixtures.py: the loss, the gradients of the student's features and of every ABF
parameter, the ABFs' BatchNorm statistics; wrong constants asserted to land far off; the per-pair channels and
sizes that kdjax derives from the models' feature shapes against the official build_review_kd table; the KD step
(teacher's pre-activation features, the warm-up by epoch) against separate passes, and under every paper scheme
(slow); the per-pair loss weights of the official script."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import augment, distillers, models
from kdjax.augment import transforms
from kdjax.distillers import review
from kdjax.train import recipe, steps
from test_distiller_fixtures import assert_far, assert_grad, assert_value, load, nchw, nhwc


def fixture_features(d, case):
    """The fixture's levels as kdjax feature lists ``[stem, maps..., pooled [B, C]]``: the stem is zeros (the
    official forward drops it), the last level is the pooled vector."""
    n = sum(1 for k in d if k.startswith(f"in_{case}_fs"))
    fs = [nhwc(d[f"in_{case}_fs{i}"]) for i in range(n)]
    ft = [nhwc(d[f"in_{case}_ft{i}"]) for i in range(n)]
    stem = np.zeros(fs[0].shape[:3] + (2,), np.float32)
    as_list = lambda lv: [jnp.asarray(stem)] + [jnp.asarray(a) for a in lv[:-1]] + [  # noqa: E731
        jnp.asarray(lv[-1].reshape(lv[-1].shape[0], -1))]
    return as_list(fs), as_list(ft)


def torch_key(case, path):
    """``abfs_0/conv1_0/kernel`` -> the fixture's ``<case>_abfs_0_conv1_0_weight`` (PyTorch's parameter name)."""
    abf, module, leaf = (getattr(k, "key", k) for k in path)
    return f"{case}_{abf}_{module}_{'bias' if leaf == 'bias' else 'weight'}"


def to_torch_layout(a):
    return np.transpose(np.asarray(a), (3, 2, 0, 1)) if np.ndim(a) == 4 else np.asarray(a)  # HWIO -> OIHW


def official_params(d, case, like):
    return jax.tree_util.tree_map_with_path(
        lambda path, ref: jnp.asarray(np.transpose(d[f"in_{torch_key(case, path)}"], (2, 3, 1, 0))
                                      if ref.ndim == 4 else d[f"in_{torch_key(case, path)}"]), like)


# "resize" (student levels at half the teacher's sizes, a residual downsampled) runs every op "same" does (equal
# sizes, the resnet/wrn pairs), which the default suite leaves to slow: one compile less.
@pytest.mark.parametrize("case", [pytest.param("same", marks=pytest.mark.slow), "resize"])
def test_loss_gradients_and_statistics_match_official(case):
    d = load("reviewkd")
    feats_s, feats_t = fixture_features(d, case)
    rk = distillers.create("reviewkd")
    layout = rk.layout(feats_s, feats_t)
    # the per-pair lists the official build_review_kd passes, derived here from the feature shapes
    assert list(layout.in_channels) == d[f"hp_{case}_in_channels"].tolist()
    assert list(layout.out_channels) == d[f"hp_{case}_out_channels"].tolist()
    assert list(layout.shapes[::-1]) == d[f"hp_{case}_shapes"].tolist()
    assert list(layout.out_shapes[::-1]) == d[f"hp_{case}_out_shapes"].tolist()
    assert layout.mid_channels == int(d[f"hp_{case}_mid_channel"])
    params0, state = jax.jit(lambda k: rk.init(k, feats_s, feats_t))(jax.random.key(0))
    params = official_params(d, case, params0)

    def fn(prm, fs):  # ReviewKD.loss is hcl_loss of fuse's outputs: one program with the wrong variants beside
        outputs, new_state = rk.fuse(prm, state, fs, layout, train=True)
        lv_t = review.levels(feats_t)
        loss = review.hcl_loss(outputs, lv_t)
        wrong = [
            sum(unnormalised_hcl_level(o, t) for o, t in zip(outputs, lv_t)),  # without / (1 + sum of weights)
            sum(jnp.mean((o - t) ** 2) for o, t in zip(outputs, lv_t)),  # no pooled context terms
            sum(jnp.sum((o - t) ** 2) / o.shape[0] for o, t in zip(outputs, lv_t)) / 100.0]  # sum reduction
        return loss, (new_state, wrong)

    (loss, (new_state, wrong)), (g_p, g_f) = jax.jit(
        jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(params, feats_s)
    assert_value(loss, d[f"{case}_loss"])
    for w in wrong:
        assert_far(w, d[f"{case}_loss"])
    assert not np.any(np.asarray(g_f[0]))  # the stem is not used
    for i, g in enumerate(g_f[1:]):
        want = d[f"grad_{case}_fs{i}"]
        assert_grad(nchw(g) if g.ndim == 4 else np.asarray(g), want.reshape(want.shape[0], -1) if g.ndim == 2
                    else want, f"d/d student level {i}")
    for path, g in jax.tree_util.tree_leaves_with_path(g_p):
        name = torch_key(case, path)
        assert_grad(to_torch_layout(g), d[f"grad_{name}"], f"d/d {name}")
    for path, v in jax.tree_util.tree_leaves_with_path(new_state["batch_stats"]):
        abf, module, stat = (getattr(k, "key", k) for k in path)
        want = d[f"out_{case}_{abf}_{module}_running_{stat}"]
        np.testing.assert_allclose(np.asarray(v), want, rtol=1e-5, atol=1e-6, err_msg=f"{abf}/{module}/{stat}")


def unnormalised_hcl_level(f_s, f_t):
    loss, weight = jnp.mean((f_s - f_t) ** 2), 1.0
    for size in review.HCL_POOL_SIZES:
        if size < f_s.shape[1]:
            weight /= 2.0
            loss = loss + weight * jnp.mean((review.adaptive_avg_pool(f_s, (size, size))
                                             - review.adaptive_avg_pool(f_t, (size, size))) ** 2)
    return loss


def test_warmup_is_the_official_factor_by_epoch():
    """train.py's ``min(1, epoch / kd_warm_up)`` over its 0-based epochs: kdjax's epoch e (1-based) gives the
    official factor of epoch e - 1; mdistiller's reading (e / warm-up, one epoch ahead) would not."""
    d = load("reviewkd")
    want = d["out_warmup_factor"]
    rk = distillers.create("reviewkd")
    assert rk.warmup == int(d["hp_warmup"]) == 20
    got = np.array([float(rk.term_scale(e)) for e in range(1, len(want) + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] == 0.0 and got[-1] == 1.0
    assert np.abs(np.minimum(np.arange(1, len(want) + 1) / 20.0, 1.0) - want).max() > 0.04
    assert float(distillers.create("reviewkd", warmup=0).term_scale(1)) == 1.0


# The official build_review_kd (CIFAR-100/model/reviewkd.py:90-150), listed as its (in_channels, out_channels,
# shapes, out_shapes): out_shapes None means shapes; resnet's shapes carry a fifth entry its zip never reads.
OFFICIAL_LAYOUTS = {
    ("resnet56", "resnet20"): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32, 32], None),  # lines 103-107
    ("resnet110", "resnet32"): ([16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32, 32], None),  # lines 103-107
    ("resnet32x4", "resnet8x4"): ([64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], None),  # 92-96
    ("wrn_40_2", "wrn_16_2"): ([32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], None),  # lines 143-148
    ("wrn_40_2", "wrn_40_1"): ([16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32], None),  # lines 143-148
    ("vgg13", "vgg8"): ([128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], None),  # 108-116
    ("ResNet50", "vgg8"): ([128, 256, 512, 512, 512], [256, 512, 1024, 2048, 2048], [1, 4, 4, 8, 16],
                           [1, 4, 8, 16, 32]),  # lines 108-114
    ("vgg13", "MobileNetV2"): ([12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], [1, 2, 4, 8, 16],
                               [1, 4, 4, 8, 16]),  # lines 117-126
    ("ResNet50", "MobileNetV2"): ([12, 16, 48, 160, 1280], [256, 512, 1024, 2048, 2048], [1, 2, 4, 8, 16],
                                  [1, 4, 8, 16, 32]),  # lines 117-123
    ("resnet32x4", "ShuffleV1"): ([240, 480, 960, 960], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("wrn_40_2", "ShuffleV1"): ([240, 480, 960, 960], [32, 64, 128, 128], [1, 4, 8, 16], [1, 8, 16, 32]),
    ("resnet32x4", "ShuffleV2"): ([116, 232, 464, 1024], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32]),
}


# The paper's CIFAR-100 pairs in the default suite, the rest (the same rule, larger models to trace) behind slow.
DEFAULT_LAYOUTS = (("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"))


@pytest.mark.parametrize("pair", [p if p in DEFAULT_LAYOUTS else pytest.param(p, marks=pytest.mark.slow)
                                  for p in OFFICIAL_LAYOUTS], ids=["-".join(p) for p in OFFICIAL_LAYOUTS])
def test_layout_from_feature_shapes_is_the_official_table(pair):
    teacher, student = pair
    in_c, out_c, shapes, out_shapes = OFFICIAL_LAYOUTS[pair]
    rk = distillers.create("reviewkd")
    layout = rk.layout(models.abstract_feature_shapes(student, 100, 32, 2),
                       models.abstract_feature_shapes(teacher, 100, 32, 2, preact=True))
    n = len(in_c)
    assert list(layout.in_channels) == in_c and list(layout.out_channels) == out_c
    assert list(layout.shapes[::-1]) == shapes[:n]
    assert list(layout.out_shapes[::-1]) == (shapes if out_shapes is None else out_shapes)[:n]
    assert layout.mid_channels == min(512, in_c[-1])


def test_bad_pairs_and_options_fail_in_one_line():
    rk = distillers.create("reviewkd")
    with pytest.raises(ValueError, match="student has 4 and the teacher 5: choose a teacher"):
        rk.check_shapes(models.abstract_feature_shapes("resnet20", 10, 32, 2),
                        models.abstract_feature_shapes("vgg13", 10, 32, 2, preact=True))
    with pytest.raises(ValueError, match="distill.warmup must be >= 0"):
        distillers.create("reviewkd", warmup=-1)
    with pytest.raises(ValueError, match="distill.mid_channels must be >= 0"):
        distillers.create("reviewkd", mid_channels=-2)
    assert rk.layout(models.abstract_feature_shapes("resnet20", 10, 32, 2),
                     models.abstract_feature_shapes("resnet56", 10, 32, 2)).mid_channels == 64
    assert distillers.create("reviewkd", mid_channels=24).layout(
        models.abstract_feature_shapes("resnet20", 10, 32, 2),
        models.abstract_feature_shapes("resnet56", 10, 32, 2)).mid_channels == 24


def test_nearest_resize_is_pytorchs():
    """F.interpolate(mode='nearest') source rows: floor(i * in / out), up (1->4, 2->4, 3->8) and down (4->2)."""
    assert review.nearest_indices(1, 4).tolist() == [0, 0, 0, 0]
    assert review.nearest_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert review.nearest_indices(3, 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert review.nearest_indices(4, 2).tolist() == [0, 2]
    x = jnp.arange(4, dtype=jnp.float32).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(review.nearest_resize(x, 4)[0, :, :, 0],
                                  np.repeat(np.repeat(np.asarray(x[0, :, :, 0]), 2, 0), 2, 1))


# ------------------------------------------------------------------------------------------------ in the KD step

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NUM_CLASSES, SIZE, BATCH, STEPS_PER_EPOCH = 4, 8, 8, 10
LR, WD = 0.1, 5e-4


@functools.lru_cache(maxsize=1)
def models_and_heads():
    """resnet8 -> resnet8 at 8 px (four levels, down to the pooled vector), their variables, the ABFs and the
    optimiser: built once for the module's step tests."""
    student, teacher = models.create("resnet8", NUM_CLASSES, SIZE), models.create("resnet8", NUM_CLASSES, SIZE)
    x0 = jnp.zeros((2, SIZE, SIZE, 3))
    svars = jax.jit(student.init)(jax.random.key(1), x0)
    tvars = jax.jit(teacher.init)(jax.random.key(2), x0)
    rk = distillers.create("reviewkd", warmup=4)
    tx, _ = recipe.make_optimizer(LR, steps_per_epoch=STEPS_PER_EPOCH, decay_epochs=(), momentum=0.9,
                                  weight_decay=WD)
    feats_s = models.feature_shapes(student, svars, BATCH, SIZE)
    feats_t = models.feature_shapes(teacher, tvars, BATCH, SIZE, preact=True)
    extra = jax.jit(lambda k: distillers.make_extra(rk, tx, k, feats_s, feats_t))(jax.random.key(4))
    return student, teacher, svars, tvars, rk, tx, extra


def step_setup(aug, epoch):
    """The KD step with ReviewKD under ``aug``, and the state at the first step of ``epoch`` (1-based)."""
    student, teacher, svars, tvars, rk, tx, extra = models_and_heads()
    state = {"params": svars["params"], "batch_stats": svars["batch_stats"], "opt_state": tx.init(svars["params"]),
             "step": jnp.asarray((epoch - 1) * STEPS_PER_EPOCH, jnp.int32), "extra": extra}
    stats = augment.DatasetStats(mean=MEAN, std=STD, image_size=SIZE, num_classes=NUM_CLASSES)
    scheme = augment.create(aug, dataset_stats=stats, n_pick=BATCH)
    w = distillers.resolve_weights(rk, aug)
    weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"])
    prepare = lambda key, im: transforms.normalize(im, MEAN, STD)  # noqa: E731
    step = steps.make_kd_step(student, teacher, tx, prepare, scheme, weights, NUM_CLASSES, distiller=rk,
                              steps_per_epoch=STEPS_PER_EPOCH)
    images = jax.random.randint(jax.random.key(3), (BATCH, SIZE, SIZE, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(BATCH, dtype=jnp.int32) % NUM_CLASSES
    return dict(student=student, teacher=teacher, svars=svars, tvars=tvars, rk=rk, state=state, step=step,
                scheme=scheme, weights=weights, prepare=prepare, batch={"images": images, "labels": labels})


def test_step_adds_the_warmed_up_term_on_the_teachers_preact_features():
    """Under flip at epoch 3 of a 4-epoch warm-up: loss = the KD loss of separate passes + beta * (3 - 1) / 4 *
    HCL(ABF(s(x)), preact t(x)) (negative somewhere, so not the post-ReLU features); the ABFs train."""
    from test_train_steps_distillers import np_kd_loss
    s = step_setup("flip", epoch=3)
    key = jax.random.key(7)
    new_state, metrics = jax.jit(s["step"])(s["state"], s["tvars"], s["batch"], key)
    student, teacher, svars, tvars, rk = s["student"], s["teacher"], s["svars"], s["tvars"], s["rk"]
    extra, labels = s["state"]["extra"], s["batch"]["labels"]

    @jax.jit
    def reference(images):
        x = s["prepare"](None, images)
        x_aug, _ = s["scheme"](jax.random.split(key)[1], x, labels)
        (fs, ls), upd = student.apply(svars, x, train=True, features=True, mutable=["batch_stats"])
        lsa, _ = student.apply({"params": svars["params"], **upd}, x_aug, train=True, mutable=["batch_stats"])
        ft, lt = teacher.apply(tvars, x, features=True, preact=True)
        term, _ = rk.loss(extra["params"], extra["state"], fs, ft)
        return ls, lsa, lt, teacher.apply(tvars, x_aug), term, jnp.min(jnp.stack([jnp.min(f) for f in ft[1:-1]]))

    ls, lsa, lt, lta, term, lowest_preact = reference(s["batch"]["images"])
    w = s["weights"]
    ref = np_kd_loss(ls, lsa, lt, lta, labels, w.gamma, w.alpha) + w.beta * 0.5 * float(term)
    assert float(metrics["loss"]) == pytest.approx(ref, rel=1e-5)
    assert float(metrics["distill"]) == pytest.approx(float(term), rel=1e-5)
    assert float(lowest_preact) < 0  # so the post-ReLU features, which the step must not use, differ from these
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_state["extra"]["params"]),
                                                         jax.tree.leaves(extra["params"]))]
    assert min(moved) > 0  # every ABF parameter is trained


@pytest.mark.slow  # nine traces of a resnet8 step; the default suite runs ReviewKD's step above and through the CLI
def test_step_composes_with_every_scheme():
    """The KD step with ReviewKD traces under each scheme (x' through the KL block, ReviewKD's term on x), the
    student-scored CutMixPick included, with the same heads and state out as in."""
    for aug in augment.PAPER_SCHEMES:
        s = step_setup(aug, epoch=1)
        new_state, metrics = jax.eval_shape(s["step"], s["state"], s["tvars"], s["batch"], jax.random.key(0))
        assert jax.tree.structure(new_state["extra"]) == jax.tree.structure(s["state"]["extra"])
        assert metrics["distill"].shape == () and metrics["loss"].shape == (), aug


# ------------------------------------------------------------------------------------------- per-pair loss weight

# dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh, one train.py line per pair: --kd-loss-weight
OFFICIAL_WEIGHTS = {
    ("wrn_40_2", "wrn_16_2"): 5.0,     # --model wrn-16-2 --teacher wrn-40-2
    ("wrn_40_2", "wrn_40_1"): 5.0,     # --model wrn-40-1 --teacher wrn-40-2
    ("wrn_40_2", "ShuffleV1"): 5.0,    # --model shufflev1 --teacher wrn-40-2
    ("resnet32x4", "resnet8x4"): 5.0,  # --model resnet8x4 --teacher resnet32x4 (mdistiller's reviewkd.yaml: 5.0)
    ("resnet32x4", "ShuffleV1"): 5.0,  # --model shufflev1 --teacher resnet32x4
    ("resnet32x4", "ShuffleV2"): 8.0,  # --model shufflev2 --teacher resnet32x4
    ("resnet56", "resnet20"): 0.6,     # --model resnet20 --teacher resnet56
    ("resnet110", "resnet32"): 1.0,    # --model resnet32 --teacher resnet110
}


def reviewkd_config(teacher, student):
    from helpers import load_config
    config = load_config("distill")
    config.distiller, config.teacher, config.student = "reviewkd", teacher, student
    return config


def test_loss_weight_per_pair_is_the_official_script_and_loss_beta_overrides_it():
    from kdjax.configs import recipes
    from kdjax.train import kd
    assert {(t, s) for d, t, s in recipes.RECIPES if d == "reviewkd"} == set(OFFICIAL_WEIGHTS)
    for (teacher, student), weight in OFFICIAL_WEIGHTS.items():
        config = reviewkd_config(teacher, student)
        assert kd.KDMethod.from_config(config).weights.beta == weight
        assert "dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh" in recipes.RECIPES[
            ("reviewkd", teacher, student)].source
    config = reviewkd_config("resnet56", "resnet20")
    assert recipes.applied("reviewkd", "resnet56", "resnet20", kd.set_by_config(config)) == {"beta": 0.6}
    assert "beta=0.6" in recipes.describe("reviewkd", "resnet56", "resnet20", kd.set_by_config(config))
    config.loss.beta = 2.0
    assert kd.KDMethod.from_config(config).weights.beta == 2.0
    assert recipes.applied("reviewkd", "resnet56", "resnet20", kd.set_by_config(config)) == {}
    assert "set by the config: beta" in recipes.describe("reviewkd", "resnet56", "resnet20",
                                                         kd.set_by_config(config))
    # a pair the script has no line for keeps the train.py default 1
    assert kd.KDMethod.from_config(reviewkd_config("vgg13", "vgg8")).weights.beta == 1.0


def test_abf_init_is_the_official_one():
    """conv1/conv2: kaiming_uniform_(a=1), U(+-sqrt(3 / fan_in)); att_conv: PyTorch's default U(+-1/sqrt(fan_in)),
    its bias too; BatchNorm scale 1, bias 0 (checked on the bound each draw stays within and nearly reaches)."""
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    feats_s = [shape(64, 8, 8, 2), shape(64, 8, 8, 24), shape(64, 4, 4, 40), shape(64, 40)]
    feats_t = [shape(64, 8, 8, 2), shape(64, 8, 8, 30), shape(64, 4, 4, 50), shape(64, 50)]
    rk = distillers.create("reviewkd")
    params, state = jax.jit(lambda k: rk.init(k, feats_s, feats_t))(jax.random.key(0))  # one compile, not per op
    assert sorted(params) == ["abfs_0", "abfs_1", "abfs_2"] and "att_conv_0" not in params["abfs_0"]
    mid = 40
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        module, name = path[-2].key, path[-1].key
        if module.startswith("conv") and name == "kernel" or module == "att_conv_0":
            fan_in = 2 * mid if name == "bias" else int(np.prod(leaf.shape[:-1]))
            bound = np.sqrt((1.0 if module == "att_conv_0" else 3.0) / fan_in)
            largest = float(jnp.abs(leaf).max())
            low = 0.8 * bound if name == "kernel" else 0.0  # att_conv's bias has two draws only
            assert low < largest <= bound, (path, largest, bound)
        else:
            assert np.all(np.asarray(leaf) == (1.0 if name == "scale" else 0.0)), path
    assert params["abfs_1"]["conv1_0"]["kernel"].shape == (1, 1, 40, mid)  # abfs_1: the 4x4x40 level
    assert params["abfs_2"]["conv2_0"]["kernel"].shape == (3, 3, mid, 30)  # abfs_2: the shallowest, to 30 channels
    assert jax.tree.structure(state["batch_stats"]["abfs_0"]) == jax.tree.structure(
        {"conv1_1": {"mean": 0, "var": 0}, "conv2_1": {"mean": 0, "var": 0}})

"""kdjax.augment: the base transform, the nine schemes and the registry, checked against NumPy references of the
original's arithmetic and against the defining properties of each scheme (docs/fidelity.md, "The nine schemes")."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import augment, losses
from kdjax.augment import transforms

MEAN = (0.5071, 0.4867, 0.4408)  # CIFAR-100 statistics of the original loader
STD = (0.2675, 0.2565, 0.2761)
STATS = {"mean": MEAN, "std": STD, "image_size": 32, "num_classes": 10}
HAS_AUTOAUGMENT = importlib.util.find_spec("kdjax.augment.autoaugment") is not None


def random_uint8(seed, n=8, size=32):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3), dtype=np.uint8)


def np_normalize(u):
    """The original's ToTensor + Normalize in float32: (u / 255 - mean) / std."""
    return (u.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)


def np_to_uint8(x):
    """The original's (std * x + mean) * 255 then the truncating cast (values stay in [0, 255] here)."""
    return np.floor(np.clip((np.float32(STD) * x + np.float32(MEAN)) * np.float32(255.0), 0, 255)).astype(np.uint8)


def normalized_batch(seed, n=8, size=32):
    return jnp.asarray(np_normalize(random_uint8(seed, n, size)))


_JITTED = {}
TRACES = {}


def run_scheme(name, key, x, labels=None, score_fn=None, **options):
    """Create + jit a scheme once per configuration (compiles dominate the run time on CPU), then call it.
    TRACES counts how often each configuration was traced."""
    cache_key = (name, x.shape, score_fn, tuple(sorted(options.items())))
    if cache_key not in _JITTED:
        scheme = augment.create(name, dataset_stats=dict(STATS, image_size=x.shape[1]), **options)

        def traced(k, im, lb):
            TRACES[cache_key] = TRACES.get(cache_key, 0) + 1
            return scheme(k, im, lb, score_fn)
        _JITTED[cache_key] = jax.jit(traced)
    return _JITTED[cache_key](key, x, labels)


def trace_count(name, shape=(8, 32, 32, 3), score_fn=None, **options):
    return TRACES.get((name, shape, score_fn, tuple(sorted(options.items()))), 0)


# ----------------------------------------------------------------------------------------- base conversions


def test_normalize_and_truncation_match_the_original_float32_arithmetic():
    every_value = np.tile(np.arange(256, dtype=np.uint8)[None, :, None, None], (1, 1, 1, 3))
    x = jax.jit(lambda u: transforms.normalize(u, MEAN, STD))(every_value)
    np.testing.assert_array_equal(np.asarray(x), np_normalize(every_value))
    back = jax.jit(lambda v: transforms.to_uint8_truncating(v, MEAN, STD))(x)
    expected = np_to_uint8(np_normalize(every_value))
    np.testing.assert_array_equal(np.asarray(back), expected)
    # the round trip is lossy: some values come back one level lower (truncation of 254.99998 etc.)
    lowered = expected.astype(int) - every_value.astype(int)
    assert set(np.unique(lowered)) <= {-1, 0} and (lowered == -1).sum() > 0


def test_to_uint8_truncates_and_clamps():
    # pixel-unit targets -> normalised inputs. Truncation, not rounding (37.6 -> 37); out-of-range values clamp
    # (torch's cast would wrap -1.5 to 255 and 300 to 44; the original never feeds it such values).
    targets = np.array([-300.0, -1.5, -0.4, 37.6, 37.99, 128.5, 254.7, 255.9, 300.0])
    want = np.array([0, 0, 0, 37, 37, 128, 254, 255, 255])
    x = ((targets / 255.0)[:, None] - np.asarray(MEAN)) / np.asarray(STD)
    x = jnp.asarray(x.reshape(1, 1, -1, 3).astype(np.float32))
    got = np.asarray(jax.jit(lambda v: transforms.to_uint8_truncating(v, MEAN, STD))(x)).reshape(-1, 3)
    np.testing.assert_array_equal(got, np.repeat(want[:, None], 3, axis=1))
    np.testing.assert_allclose(np.asarray(transforms.denormalize(x, MEAN, STD)).reshape(-1, 3) * 255,
                               np.repeat(targets[:, None], 3, axis=1), rtol=1e-5, atol=1e-3)


def test_base_train_transform_per_sample_offsets_flips_and_zero_padding():
    n, pad = 256, 4
    images = np.full((n, 32, 32, 3), 200, np.uint8)
    images[:, :, :16] = 100  # left half darker, so a flip is visible
    key = jax.random.key(3)
    out = np.asarray(jax.jit(lambda k, u: transforms.base_train_transform(k, u, pad))(key, images))
    offsets, flips = (np.asarray(v) for v in transforms.draw_crop_flip(key, n, pad))
    assert offsets.min() == 0 and offsets.max() == 2 * pad
    assert len(np.unique(offsets[:, 0])) == 2 * pad + 1 and 0.3 < flips.mean() < 0.7  # per sample, all offsets
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for i in range(n):
        top, left = offsets[i]
        ref = padded[i, top:top + 32, left:left + 32]
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)
        zero_rows = abs(top - pad)
        assert (out[i] == 0).all(axis=(1, 2)).sum() == zero_rows  # black padding rows, nothing else is zero
    assert out.dtype == np.uint8


# ------------------------------------------------------------------------------------------------- schemes


def np_round_trip(x, transform):
    return np_normalize(transform(np_to_uint8(np.asarray(x))))


@pytest.mark.parametrize("per_sample", [False, True])
def test_flip_and_crop_flip_round_trip_match_numpy_reference(per_sample):
    x = normalized_batch(0)
    seen_flips = set()
    for seed in range(4):
        out, aux = run_scheme("flip", jax.random.key(seed), x, per_sample=per_sample)
        coins = np.broadcast_to(np.asarray(aux["flip"]), (x.shape[0],))
        seen_flips.update(coins.tolist())
        ref = np_round_trip(x, lambda u: np.where(coins[:, None, None, None], u[:, :, ::-1], u))
        np.testing.assert_array_equal(np.asarray(out), ref)

        out, aux = run_scheme("crop_flip", jax.random.key(seed), x, per_sample=per_sample)
        offsets = np.broadcast_to(np.asarray(aux["offset"]), (x.shape[0], 2))
        coins = np.broadcast_to(np.asarray(aux["flip"]), (x.shape[0],))
        assert offsets.min() >= 0 and offsets.max() <= 8

        def crop_then_flip(u):
            padded = np.pad(u, ((0, 0), (4, 4), (4, 4), (0, 0)))
            crops = np.stack([padded[i, t:t + 32, l:l + 32] for i, (t, l) in enumerate(offsets)])
            return np.where(coins[:, None, None, None], crops[:, :, ::-1], crops)
        np.testing.assert_array_equal(np.asarray(out), np_round_trip(x, crop_then_flip))
    assert seen_flips == {True, False}


def test_identity_returns_the_batch():
    x = normalized_batch(1)
    out, aux = run_scheme("identity", jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    assert aux == {}


@pytest.mark.parametrize("size,hole", [(32, 8), (64, 16)])
def test_cutout_one_clipped_hole_of_zeros(size, hole):
    x = normalized_batch(2, n=4, size=size)
    assert not (np.asarray(x) == 0).any()
    clipped = 0
    for seed in range(12):
        out, aux = run_scheme("cutout", jax.random.key(seed), x)
        y1, y2, x1, x2 = np.asarray(aux["box"])
        for lo, hi in ((y1, y2), (x1, x2)):
            assert 0 <= lo < hi <= size
            assert hi - lo == hole or lo == 0 or hi == size  # full side unless clipped at the border
            clipped += hi - lo < hole
        expected = np.asarray(x).copy()
        expected[:, y1:y2, x1:x2, :] = 0.0
        np.testing.assert_array_equal(np.asarray(out), expected)  # same hole in every image of the batch
    assert clipped > 0


def test_mixup_is_linear_in_normalised_space():
    x = normalized_batch(3)
    for per_sample in (False, True):
        out, aux = run_scheme("mixup", jax.random.key(5), x, per_sample=per_sample)
        lam, perm = np.asarray(aux["lam"]), np.asarray(aux["perm"])
        assert sorted(perm.tolist()) == list(range(8)) and ((0 <= lam) & (lam < 1)).all()
        lam_b = lam.reshape(lam.shape + (1,) * (4 - lam.ndim))
        xn = np.asarray(x)
        # equal up to float32 rounding (XLA may fuse the multiply-add)
        np.testing.assert_allclose(np.asarray(out), lam_b * xn + (1 - lam_b) * xn[perm], rtol=0, atol=1e-6)


def cutmix_source_masks(x, out, perm):
    """Per image: True where the pixel came from x[perm] (differs from x), all channels considered."""
    x, out = np.asarray(x), np.asarray(out)
    from_partner = (out == x[perm]).all(-1)
    assert (from_partner | (out == x).all(-1)).all()  # every pixel is either own or partner's
    return from_partner & ~(out == x).all(-1)


def test_cutmix_fraction_box_and_derangement():
    x = normalized_batch(4, n=6)
    f = jax.jit(augment.create("cutmix", STATS))
    for seed in range(30):
        out, aux = f(jax.random.key(seed), x, None)
        perm, lam = np.asarray(aux["perm"]), float(aux["lam"])
        y1, y2, x1, x2 = np.asarray(aux["box"])
        assert (perm != np.arange(6)).all() and sorted(perm.tolist()) == list(range(6))
        mixed = cutmix_source_masks(x, out, perm)
        np.testing.assert_allclose(mixed.mean(axis=(1, 2)), 1 - lam, atol=1e-6)
        np.testing.assert_array_equal(mixed[0, y1:y2, x1:x2], True)
        if 0 < y1 and y2 < 32 and 0 < x1 and x2 < 32:  # not clipped: square with an even side
            assert (y2 - y1) == (x2 - x1) and (y2 - y1) % 2 == 0


def test_derangement_has_no_fixed_points_and_is_uniform():
    draw = jax.jit(jax.vmap(lambda k: augment.derangement(k, 3)))
    perms = np.asarray(draw(jax.random.split(jax.random.key(0), 400)))
    assert (perms != np.arange(3)).all()
    counts = {tuple(p): c for p, c in zip(*np.unique(perms, axis=0, return_counts=True))}
    assert set(counts) == {(1, 2, 0), (2, 0, 1)} and 150 < counts[(1, 2, 0)] < 250
    for n in (2, 5, 64):
        p = np.asarray(jax.jit(augment.derangement, static_argnums=1)(jax.random.key(n), n))
        assert (p != np.arange(n)).all() and sorted(p.tolist()) == list(range(n))


def fake_score_fn(scores):
    """score_fn with known scores; its new_state carries the pool so the test can check what was picked."""
    def score_fn(pool):
        return jnp.asarray(scores, jnp.float32), {"pool": pool, "calls": jnp.ones((), jnp.int32)}
    return score_fn


@pytest.mark.parametrize("name", ["cutmix_pick_s", "cutmix_pick_t"])
def test_cutmix_pick_keeps_top_scores_in_ascending_order(name):
    batch = 8
    x = normalized_batch(5, n=batch)
    labels = jnp.arange(batch, dtype=jnp.int32)
    scores = np.random.RandomState(0).permutation(2 * batch).astype(np.float32)
    out, aux = run_scheme(name, jax.random.key(1), x, labels, fake_score_fn(scores))
    expected = np.argsort(scores)[-batch:]  # the original: ascending sort, keep the last n_pick
    np.testing.assert_array_equal(np.asarray(aux["picked"]), expected)
    pool = np.asarray(aux["score_state"]["pool"])
    assert pool.shape == (2 * batch, 32, 32, 3) and int(aux["score_state"]["calls"]) == 1
    np.testing.assert_array_equal(np.asarray(out), pool[expected])
    # the pool is two CutMix draws in run order, each with its own derangement
    for run in range(2):
        perm = np.asarray(aux["pool_perm"][run])
        mixed = cutmix_source_masks(x, pool[run * batch:(run + 1) * batch], perm)
        np.testing.assert_allclose(mixed.mean(axis=(1, 2)), 1 - float(aux["pool_lam"][run]), atol=1e-6)
    # soft targets of the picked images: lam * onehot(source) + (1 - lam) * onehot(partner)
    targets = np.asarray(aux["targets"])
    src, partner, lam = (np.asarray(aux[k]) for k in ("source", "partner", "lam"))
    np.testing.assert_array_equal(src, expected % batch)
    np.testing.assert_allclose(targets[np.arange(batch), src], lam, atol=1e-6)
    np.testing.assert_allclose(targets[np.arange(batch), partner], 1 - lam, atol=1e-6)
    assert augment.create(name, STATS).scorer == {"s": "student", "t": "teacher"}[name[-1]]


def test_cutmix_pick_n_pick_caps_at_pool_and_needs_score_fn():
    x = normalized_batch(6, n=4)
    scores = np.arange(8, dtype=np.float32)[::-1]
    out, aux = run_scheme("cutmix_pick_t", jax.random.key(0), x, None, fake_score_fn(scores), n_pick=64)
    assert out.shape[0] == 8  # short batch: min(n_pick, 2 * batch)
    np.testing.assert_array_equal(np.asarray(aux["picked"]), np.argsort(scores))
    with pytest.raises(ValueError, match="score_fn"):
        run_scheme("cutmix_pick_s", jax.random.key(0), x)


@pytest.mark.skipif(not HAS_AUTOAUGMENT, reason="kdjax/augment/autoaugment.py not written yet")
def test_autoaugment_round_trips_through_uint8_and_compiles_once():
    from kdjax.augment import autoaugment as ops
    x = normalized_batch(7)
    pixels = jnp.asarray(np_to_uint8(np.asarray(x)))
    outs = []
    for seed in (2, 3, 2):
        out, _ = run_scheme("autoaugment", jax.random.key(seed), x)
        ref = ops.autoaugment(jax.random.key(seed), pixels, policy="cifar10", per_sample=False)
        np.testing.assert_array_equal(np.asarray(out), np_normalize(np.asarray(ref)))
        outs.append(np.asarray(out))
    np.testing.assert_array_equal(outs[0], outs[2])
    assert trace_count("autoaugment") == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AUTOAUGMENT, reason="kdjax/augment/autoaugment.py not written yet")
def test_autoaugment_per_sample_differs_across_images():
    x = jnp.broadcast_to(normalized_batch(9, n=1), (16, 32, 32, 3))
    out, _ = run_scheme("autoaugment", jax.random.key(4), x, per_sample=True)
    assert len({np.asarray(o).tobytes() for o in out}) > 1


# --------------------------------------------------------------------------- determinism, compiles, per sample


PAPER_SCHEMES = ["identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix", "cutmix_pick_s",
                 "cutmix_pick_t"]
# AutoAugment compiles for a long time on CPU; its own test above covers determinism and the single trace.
CHEAP_SCHEMES = [n for n in PAPER_SCHEMES if n != "autoaugment"]
KNOWN_SCORES = fake_score_fn(np.random.RandomState(1).permutation(16).astype(np.float32))


@pytest.mark.parametrize("name", CHEAP_SCHEMES)
def test_same_key_same_output_and_one_trace_for_many_keys(name):
    x = normalized_batch(8)
    score_fn = KNOWN_SCORES if name.startswith("cutmix_pick") else None
    outs = [np.asarray(run_scheme(name, jax.random.key(s), x, None, score_fn)[0]) for s in (0, 1, 2, 0)]
    assert trace_count(name, score_fn=score_fn) == 1
    np.testing.assert_array_equal(outs[0], outs[3])
    if name != "identity":
        assert not all(np.array_equal(outs[0], o) for o in outs[1:3])


@pytest.mark.parametrize("name", ["flip", "crop_flip", "cutout", "mixup", "cutmix"])
def test_per_sample_variants_differ_across_images(name):
    if name in ("mixup", "cutmix"):
        x = normalized_batch(9, n=16)
        _, aux = run_scheme(name, jax.random.key(4), x, per_sample=True)
        assert np.asarray(aux["lam"]).shape == (16,) and len(np.unique(np.asarray(aux["lam"]))) > 1
        _, aux = run_scheme(name, jax.random.key(4), x, per_sample=False)
        assert np.asarray(aux["lam"]).shape == ()
        return
    x = jnp.broadcast_to(normalized_batch(9, n=1), (16, 32, 32, 3))  # 16 copies of one image
    batch_out, _ = run_scheme(name, jax.random.key(4), x, per_sample=False)
    sample_out, _ = run_scheme(name, jax.random.key(4), x, per_sample=True)
    # one draw for the batch keeps the copies equal; per-sample draws do not
    assert all(np.array_equal(np.asarray(batch_out[0]), np.asarray(o)) for o in batch_out)
    assert len({np.asarray(o).tobytes() for o in sample_out}) > 1


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_errors_and_user_schemes():
    assert augment.names()[:9] == ["identity", "flip", "crop_flip", "cutout", "autoaugment", "mixup", "cutmix",
                                   "cutmix_pick_s", "cutmix_pick_t"]
    with pytest.raises(ValueError, match="valid augmentations: identity, flip"):
        augment.create("cutmixx", STATS)
    with pytest.raises(ValueError, match="valid options"):
        augment.create("cutout", STATS, hole=3)
    with pytest.raises(ValueError, match="valid criteria"):
        augment.create("cutmix_pick_s", STATS, criterion="variance")
    with pytest.raises(ValueError, match="missing image_size"):
        augment.create("flip", {"mean": MEAN, "std": STD})
    with pytest.raises(ValueError, match="built-in"):
        augment.register("flip", lambda stats, opts: None)

    def negate(stats, opts):
        return lambda key, images, labels, score_fn=None: (-images, {"scale": -1.0})
    augment.register("test_negate", negate)
    assert "test_negate" in augment.names()
    x = normalized_batch(10, n=2)
    out, aux = augment.create("test_negate", STATS)(jax.random.key(0), x, None)
    np.testing.assert_array_equal(np.asarray(out), -np.asarray(x)) and aux == {"scale": -1.0}
    scheme = augment.create("cutmix_pick_t", STATS, criterion="kld")
    assert scheme.needs_score_fn and scheme.criterion == "kld" and augment.create("mixup", STATS).scorer is None
    opts = augment.create("cutout", dict(STATS, image_size=64)).options
    assert (opts.cutout_size, opts.policy, opts.crop_pad) == (16, "imagenet", 8)
    opts = augment.create("cutout", STATS).options
    assert (opts.cutout_size, opts.policy, opts.crop_pad) == (8, "cifar10", 4)


def test_entropy_and_kld_score_match_formulas():
    rng = np.random.RandomState(0)
    s, t = rng.randn(5, 7).astype(np.float32) * 3, rng.randn(5, 7).astype(np.float32) * 3

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p = softmax(t)
    np.testing.assert_allclose(np.asarray(augment.entropy(t)), -(p * np.log(p)).sum(1), rtol=1e-5)
    pt, qs = softmax(t / 4), softmax(s / 4)
    np.testing.assert_allclose(np.asarray(losses.kd_kl_per_sample(s, t)), (pt * (np.log(pt) - np.log(qs))).sum(1),
                               rtol=1e-5, atol=1e-7)
    assert np.isfinite(np.asarray(augment.entropy(jnp.array([[0.0, 500.0, -500.0]])))).all()


# ------------------------------------------------------------------------------------------- multi-device


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kdjax import augment
    from kdjax.augment import transforms
    jax.config.update("jax_disable_most_optimizations", True)
    assert jax.device_count() == 8, jax.devices()
    stats = json.loads(sys.argv[1])
    names = json.loads(sys.argv[2])
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    u = np.random.RandomState(0).randint(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int32) % 10
    x = transforms.normalize(jnp.asarray(u), stats["mean"], stats["std"])
    def score_fn(pool):  # depends on the pool, so a wrong pool changes the pick
        return jnp.mean(pool, axis=(1, 2, 3)), None
    # every scheme in one program: two compiles in all (one per input placement)
    schemes = {(name, ps): augment.create(name, stats, per_sample=ps) for name in names for ps in (False, True)}
    def all_schemes(key, images, lbls):
        outs = {f"{name} per_sample={ps}": s(key, images, lbls, score_fn)[0] for (name, ps), s in schemes.items()}
        outs["base_train_transform"] = transforms.base_train_transform(key, transforms.to_uint8_truncating(
            images, stats["mean"], stats["std"]), 4)
        return outs
    f = jax.jit(all_schemes)
    one = jax.device_get(f(jax.random.key(7), x, labels))
    eight = jax.device_get(f(jax.random.key(7), jax.device_put(x, rows), jax.device_put(labels, rows)))
    mismatches = sorted(k for k in one if not np.array_equal(one[k], eight[k]))
    print(json.dumps({"mismatches": mismatches}))
""")


def test_batch_sharded_over_8_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, json.dumps(STATS), json.dumps(CHEAP_SCHEMES)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"mismatches": []}


# ------------------------------------------------------------------------------------------------ gallery


def test_gallery_task_writes_png_of_the_schemes(tmp_path):
    import importlib.util as iu
    from PIL import Image
    from kdjax.tasks import augment_gallery
    spec = iu.spec_from_file_location("gallery_config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                     "augment_gallery.py"))
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("aug=cutout+cutmix_pick_t,num_images=4")
    assert config.task == "augment_gallery" and config.dataset == "digits"
    path = augment_gallery.run(config, str(tmp_path))
    with Image.open(path) as png:
        assert png.size[0] > 200 and png.size[1] > 200
    summary = json.loads((tmp_path / "augment_gallery.json").read_text())
    assert summary["schemes"] == ["cutout", "cutmix_pick_t"]
    y1, y2, x1, x2 = summary["params"]["cutout"]["box"]
    assert y2 - y1 in range(1, 9) and x2 - x1 in range(1, 9)
    assert len(summary["params"]["cutmix_pick_t"]["picked"]) == 4
    with pytest.raises(ValueError, match="valid augmentations"):
        augment_gallery.run(module.get_config("aug=cutmixx"), str(tmp_path))

"""AutoAugment ops and sub-policies against torchvision, plus the randomness and compile contracts.

Fixture ``tests/fixtures/autoaugment_torchvision.npz`` was written once with torch 2.14.1 / torchvision 0.29.1
(CPU) from two sets of structured uint8 images (gradients, blobs, stripes, a low-contrast image; no channel is
flat): ``in__a`` [4, 32, 32, 3] and the non-square ``in__b`` [2, 20, 28, 3], so that width/height mix-ups show.
Every op ran at bins {0, 3, 9} and, for signed ops, both signs, as a torchvision tensor op on the uint8 batch
in NCHW (stored back as NHWC):

* ``out__<set>__0.10__<op>__b<bin>__s<sign>``: the calls torchvision 0.10's ``AutoAugment.forward`` made, with
  0.10's magnitude tables evaluated by ``torch.linspace``: ``F.affine(shear=[degrees(m), 0])`` (resp.
  ``[0, degrees(m)]``) with no centre, ``F.affine(translate=[int(W*m), 0])`` (resp. ``[0, int(H*m)]``),
  ``F.rotate(m)``, ``F.adjust_brightness / adjust_saturation / adjust_contrast / adjust_sharpness(1 + m)``,
  ``F.posterize(int(m))``, ``F.solarize(m)``, ``F.autocontrast``, ``F.equalize``, ``F.invert``; NEAREST, no fill.
  These functions have kept their 0.10 definitions, with two exceptions handled in the generator: the solarize
  threshold 256 of bin 0 is now rejected (0.10 accepted it and selected no pixel, so the stored output is the
  input) and autocontrast now tests flat channels per channel instead of per image (the same on these images;
  the flat case is tested below against its formula).
* ``out__<set>__current__<op>__...``: for the ops whose AutoAugment definition changed since 0.10 (ShearX,
  ShearY, TranslateX, TranslateY, Solarize, AutoContrast), ``torchvision.transforms.autoaugment._apply_op`` with
  magnitudes from ``AutoAugment()._augmentation_space(10, (H, W))``.
* ``draw<k>__*``: whole sub-policies through ``AutoAugment(policy, NEAREST).forward`` on ``in__a`` with
  ``get_params`` pinned to (index, coins, signs); torch's sign 0 means a negated magnitude.
* ``mag__*``: the magnitude grids (0.10's and the current ones at both image sizes); ``policy__*``: the policy
  tables of ``AutoAugment(policy).policies``.

Every op agrees exactly with torchvision here, so the comparisons are exact.
"""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.augment import autoaugment as aa


FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "autoaugment_torchvision.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def golden_cases(golden, image_set, semantics):
    """[(op, bin or None, sign, expected)] of one image set and semantics, in a fixed order."""
    cases = []
    for key in sorted(golden):
        if not key.startswith(f"out__{image_set}__{semantics}__"):
            continue
        _, _, _, op, b, s = key.split("__")
        b, s = int(b[1:]), int(s[1:])
        cases.append((op, None if b < 0 else b, s, golden[key]))
    return cases


def run_cases(images, cases, semantics):
    """Each case as the first stage of a sub-policy draw (second stage Identity), through one compiled
    ``apply_subpolicy``: the op index, bin and sign are traced, so all cases share a single compile."""
    run = jax.jit(lambda draw: aa.apply_subpolicy(images, draw, semantics=semantics))
    return [np.asarray(run(dict(ops=jnp.asarray([aa.OP_INDEX[op], aa.IDENTITY], jnp.int32),
                                bins=jnp.asarray([b or 0, 0], jnp.int32),
                                signs=jnp.asarray([s, 1], jnp.int32))))
            for op, b, s, _ in cases]


@pytest.mark.parametrize("image_set,semantics", [("a", "0.10"), ("b", "0.10"), ("a", "current"),
                                                 ("b", "current")])
def test_every_op_matches_torchvision(golden, image_set, semantics):
    images = golden[f"in__{image_set}"]
    cases = golden_cases(golden, image_set, semantics)
    expected_ops = aa.OP_NAMES[1:] if semantics == "0.10" else (
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Solarize", "AutoContrast")
    assert {op for op, _, _, _ in cases} == set(expected_ops)
    outputs = run_cases(images, cases, semantics)
    changed = 0
    for (op, b, s, expected), got in zip(cases, outputs):
        mismatch = int((got != expected).sum())
        assert mismatch == 0, f"{op} bin {b} sign {s} ({semantics}): {mismatch} pixels differ from torchvision"
        changed += int((expected != images).any())
    assert changed >= len(cases) // 2  # the comparison is not one of unchanged images


@functools.lru_cache(maxsize=None)
def jitted_op(op_name):
    """apply_op for one op name, jitted with the bin and sign traced (one compile per op and shape)."""
    return jax.jit(lambda images, b, s: aa.apply_op(images, op_name, b, s))


# One jitted batch AutoAugment shared by the tests below; ``TRACES`` counts how often it was traced.
TRACES = []


@jax.jit
def batch_autoaugment(key, images):
    TRACES.append(1)
    return aa.autoaugment(key, images, policy="cifar10")


def test_apply_op_by_name_matches_torchvision(golden):
    images = golden["in__a"]
    np.testing.assert_array_equal(np.asarray(aa.apply_op(images, "Invert")), golden["out__a__0.10__Invert__b-1__s1"])
    for op, b, s in [("ShearX", 9, -1), ("ShearX", 3, 1), ("Equalize", 0, 1)]:
        expected = golden[f"out__a__0.10__{op}__b{-1 if op == 'Equalize' else b}__s{s}"]
        np.testing.assert_array_equal(np.asarray(jitted_op(op)(images, b, s)), expected)


def test_subpolicies_match_torchvision_forward(golden):
    images = golden["in__a"]
    draws = sorted({k.split("__")[0] for k in golden if k.startswith("draw")})
    assert len(draws) == 8
    for name in draws:
        policy = str(golden[f"{name}__policy"])
        index = int(golden[f"{name}__index"])
        table = aa.POLICIES[policy][index]
        coins = golden[f"{name}__coins"]
        applied = coins <= np.asarray([p for _, p, _ in table], np.float32)
        draw = dict(ops=jnp.asarray([aa.OP_INDEX[op] if run else aa.IDENTITY
                                     for (op, _, _), run in zip(table, applied)], jnp.int32),
                    bins=jnp.asarray([b or 0 for _, _, b in table], jnp.int32),
                    signs=jnp.asarray(np.where(golden[f"{name}__torch_signs"] == 0, -1, 1), jnp.int32))
        got = np.asarray(aa.apply_subpolicy(images, draw, semantics="current"))
        np.testing.assert_array_equal(got, golden[f"{name}__out"], err_msg=f"{policy} sub-policy {index}")


def test_policy_tables_match_torchvision(golden):
    for policy, table in aa.POLICIES.items():
        assert len(table) == 25 and all(len(pair) == 2 for pair in table)
        ops = np.asarray([[op for op, _, _ in pair] for pair in table])
        probs = np.asarray([[p for _, p, _ in pair] for pair in table])
        bins = np.asarray([[-1 if b is None else b for _, _, b in pair] for pair in table])
        np.testing.assert_array_equal(ops, golden[f"policy__{policy}__ops"])
        np.testing.assert_array_equal(probs, golden[f"policy__{policy}__probs"])
        np.testing.assert_array_equal(bins, golden[f"policy__{policy}__bins"])
        assert set(ops.ravel()) <= set(aa.OP_NAMES)


def test_magnitude_grids_match_torch(golden):
    for key in golden:
        if not key.startswith("mag__"):
            continue
        parts = key.split("__")
        semantics, op = parts[1], parts[2]
        size = golden[f"in__{parts[3]}"].shape[1:3] if len(parts) == 4 else (32, 32)
        ours = np.asarray([aa.magnitude(op, b, 1, size, semantics) for b in range(aa.NUM_BINS)], np.float32)
        np.testing.assert_array_equal(ours, golden[key].astype(np.float32), err_msg=key)
    # The values the original code uses.
    assert [aa.magnitude("Posterize", b) for b in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert aa.magnitude("Solarize", 0) == 256.0 and aa.magnitude("Solarize", 0, semantics="current") == 255.0
    assert aa.magnitude("Rotate", 9, -1) == -30.0 and aa.magnitude("Equalize", None) == 0.0


def flat_channel_images():
    rng = np.random.default_rng(3)
    images = rng.integers(40, 200, size=(3, 8, 8, 3)).astype(np.uint8)
    images[0, ..., 1] = 77  # image 0 has a flat green channel
    return images


def numpy_autocontrast(images, whole_image_when_flat):
    """The definition, in float32 as torch: (x - min) * (255 * (1 / (max - min))), truncated; flat -> unchanged."""
    x = images.astype(np.float32)
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    flat = lo == hi
    if whole_image_when_flat:
        flat = np.broadcast_to(flat.any(axis=-1, keepdims=True), flat.shape)
    spread = np.where(flat, np.float32(1), hi - lo)
    scale = np.where(flat, np.float32(1), (np.float32(1) / spread) * np.float32(255))
    lo = np.where(flat, np.float32(0), lo)
    return np.floor(np.clip((x - lo) * scale, 0, 255)).astype(np.uint8)


def test_autocontrast_flat_channel_semantics():
    images = flat_channel_images()
    legacy = np.asarray(aa.apply_op(images, "AutoContrast"))
    current = np.asarray(aa.apply_op(images, "AutoContrast", semantics="current"))
    np.testing.assert_array_equal(legacy, numpy_autocontrast(images, whole_image_when_flat=True))
    np.testing.assert_array_equal(current, numpy_autocontrast(images, whole_image_when_flat=False))
    np.testing.assert_array_equal(legacy[0], images[0])  # 0.10: the whole image with a flat channel is kept
    assert (current[0, ..., 0] != images[0, ..., 0]).any()  # current: its other channels are stretched
    np.testing.assert_array_equal(legacy[1:], current[1:])


def test_same_key_same_output_one_compile(golden):
    images = jnp.asarray(golden["in__a"])
    key = jax.random.key(7)
    np.testing.assert_array_equal(np.asarray(batch_autoaugment(key, images)),
                                  np.asarray(batch_autoaugment(key, images)))
    outputs = {np.asarray(batch_autoaugment(jax.random.key(seed), images)).tobytes() for seed in range(6)}
    assert len(outputs) > 1  # keys matter
    assert len(TRACES) == 1  # op choice, bins, signs and coins are traced: one compile serves every key


def test_batch_draw_is_one_subpolicy_for_all_images(golden):
    images = golden["in__a"]
    ops_seen = 0
    for seed in range(6):
        key = jax.random.key(100 + seed)
        draw = jax.device_get(aa.sample_subpolicy(key, "cifar10"))
        table = aa.CIFAR10_POLICY[int(draw["index"])]
        expected = images
        for stage, (op, _, b) in enumerate(table):
            if draw["applied"][stage]:
                expected = jitted_op(op)(expected, b or 0, int(draw["signs"][stage]))
                ops_seen += 1
        np.testing.assert_array_equal(np.asarray(batch_autoaugment(key, images)), np.asarray(expected))
    assert ops_seen >= 3  # the keys above exercise real ops, not only skipped coins
    # The same image repeated comes out identical in every slot: one draw for the batch.
    repeated = np.repeat(images[1:2], 4, axis=0)
    for seed in range(4):
        out = np.asarray(batch_autoaugment(jax.random.key(seed), repeated))
        assert all((out[i] == out[0]).all() for i in range(4))
    assert len(TRACES) <= 1


def test_per_sample_draws_independently(golden):
    image = golden["in__a"][1]
    repeated = np.repeat(image[None], 8, axis=0)
    key = jax.random.key(11)
    out = np.asarray(jax.jit(aa.autoaugment, static_argnames=("policy", "per_sample"))(
        key, repeated, policy="imagenet", per_sample=True))
    assert len({o.tobytes() for o in out}) > 2
    # Image i got the sub-policy drawn with the i-th split key.
    keys = jax.random.split(key, 8)
    one = jax.jit(lambda k, x: aa.apply_subpolicy(x, aa.sample_subpolicy(k, "imagenet")))
    for i in (0, 5):
        np.testing.assert_array_equal(out[i], np.asarray(one(keys[i], repeated[i:i + 1]))[0])


def test_sampling_frequencies():
    keys = jax.random.split(jax.random.key(0), 2500)
    draws = jax.device_get(jax.jit(jax.vmap(lambda k: aa.sample_subpolicy(k, "cifar10")))(keys))
    counts = np.bincount(draws["index"], minlength=25)
    assert counts.min() > 55 and counts.max() < 145  # uniform: 100 expected per sub-policy
    probs = np.asarray([[p for _, p, _ in pair] for pair in aa.CIFAR10_POLICY])[draws["index"]]
    assert abs(draws["applied"].mean() - probs.mean()) < 0.03
    assert set(np.unique(draws["signs"])) == {-1, 1} and abs((draws["signs"] > 0).mean() - 0.5) < 0.03
    skipped = ~draws["applied"]
    assert (draws["ops"][skipped] == aa.IDENTITY).all()


def test_errors_name_the_fix():
    images = jnp.zeros((2, 8, 8, 3), jnp.uint8)
    with pytest.raises(ValueError, match="valid ops: Identity, ShearX"):
        aa.apply_op(images, "Shear", 3)
    with pytest.raises(ValueError, match="magnitude_bin must be in 0..9"):
        aa.apply_op(images, "Rotate", 10)
    with pytest.raises(ValueError, match="needs a magnitude_bin"):
        aa.apply_op(images, "Rotate", None)
    with pytest.raises(ValueError, match="sign must be"):
        aa.apply_op(images, "Rotate", 3, 2)
    with pytest.raises(ValueError, match="uint8"):
        aa.apply_op(images.astype(jnp.float32), "Invert")
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        aa.apply_op(jnp.zeros((2, 3, 8, 8), jnp.uint8), "Invert")
    with pytest.raises(ValueError, match="valid policies: cifar10, imagenet"):
        aa.autoaugment(jax.random.key(0), images, policy="svhn")
    with pytest.raises(ValueError, match="'0.10'"):
        aa.apply_op(images, "Invert", semantics="0.9")

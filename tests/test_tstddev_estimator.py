"""GroupedStddev against the original's published stream and float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from kdjax.tstddev import GroupedStddev


def load_public_stream(fixtures_dir):
    data = np.load(fixtures_dir / "tstddev_stream_public.npz")
    names = sorted(k for k in data.files if k.startswith("entry"))
    assert names == [f"entry{i:05d}" for i in range(len(names))]  # in order, none missing
    return [data[k] for k in names], float(data["value"]), int(data["groups"])


def numpy_group_means(entries, entries_per_group):
    """The original's T. stddev (docs/fidelity.md) restated in float64: pool the rows of each run of entries; a partial group at the end is dropped."""
    complete = len(entries) // entries_per_group * entries_per_group
    return np.stack([np.concatenate(entries[i:i + entries_per_group]).astype(np.float64).mean(axis=0)
                     for i in range(0, complete, entries_per_group)])


def numpy_tstddev(group_means):
    return group_means.std(axis=0, ddof=1).mean()


def numpy_jackknife_se(group_means, buckets):
    """Brute force: leave each round-robin bucket of groups out, recompute the metric from the raw group means."""
    labels = np.arange(len(group_means)) % buckets
    used = np.unique(labels)
    theta = np.array([numpy_tstddev(group_means[labels != b]) for b in used])
    k = len(used)
    return np.sqrt((k - 1) / k * ((theta - theta.mean()) ** 2).sum())


def random_probs(rng, rows, classes, sharpness=3.0):
    logits = sharpness * rng.normal(size=(rows, classes))
    return scipy.special.softmax(logits, axis=-1).astype(np.float32)


def run_stream(est, entries, masks=None, mode="jit"):
    state = est.init()
    masks = masks if masks is not None else [None] * len(entries)
    update = jax.jit(est.update) if mode == "jit" else est.update
    for entry, mask in zip(entries, masks):
        state = update(state, entry, mask)
    return state


@pytest.mark.parametrize("mode", ["eager", "jit", "update_many"])
def test_public_stream_matches_original(fixtures_dir, mode):
    entries, value, groups = load_public_stream(fixtures_dir)
    est = GroupedStddev(num_classes=entries[0].shape[1], entries_per_group=10)
    if mode == "update_many":
        state = jax.jit(est.update_many)(est.init(), jnp.asarray(np.stack(entries)))
    else:
        state = run_stream(est, entries, mode=mode)
    out = est.result(state)
    assert out["groups"] == groups
    np.testing.assert_allclose(out["tstddev"], value, rtol=1e-6)
    # The fixture leaves a partial group (106 entries): the value must come from the complete ones only.
    assert len(entries) % 10 != 0
    np.testing.assert_allclose(out["tstddev"], numpy_tstddev(numpy_group_means(entries, 10)), rtol=1e-6)


def test_result_arrays_jittable_and_equal_to_host(fixtures_dir):
    entries, _, _ = load_public_stream(fixtures_dir)
    est = GroupedStddev(num_classes=100)
    state = run_stream(est, entries)
    host = est.result(state)
    device = jax.jit(est.result_arrays)(state)
    assert set(device) == set(host) == {"tstddev", "tstddev_se", "groups", "mean_entropy"}
    assert all(isinstance(v, float) for k, v in host.items() if k != "groups") and isinstance(host["groups"], int)
    for key in host:
        np.testing.assert_allclose(np.asarray(device[key]), host[key], rtol=2e-5)


def test_padded_rows_are_ignored_exactly():
    rng = np.random.default_rng(1)
    classes, capacity = 7, 16
    rows = rng.choice([1, 9, capacity], size=23)  # few distinct shapes: each one is a compile
    entries = [random_probs(rng, int(r), classes) for r in rows]
    padded, masks = [], []
    for entry in entries:
        # Garbage in padded rows (NaN and huge values) must not leak into sums, counts or entropy.
        pad = np.full((capacity - len(entry), classes), np.nan, np.float32)
        pad[::2] = 1e6
        padded.append(np.concatenate([entry, pad]))
        masks.append(np.arange(capacity) < len(entry))
    est = GroupedStddev(num_classes=classes, entries_per_group=4, se_buckets=3)
    plain = est.result(run_stream(est, entries))
    masked = est.result(run_stream(est, padded, masks))
    assert plain["groups"] == masked["groups"] == 23 // 4
    assert plain == masked
    means = numpy_group_means(entries, 4)
    np.testing.assert_allclose(plain["tstddev"], numpy_tstddev(means), rtol=1e-5)
    # Fully masked entries are no entries: a stack may be padded with them without shifting the groups.
    stack = np.stack(padded[:5] + [np.zeros((capacity, classes), np.float32)] * 2 + padded[5:])
    stack_masks = np.stack(masks[:5] + [np.zeros(capacity, bool)] * 2 + masks[5:])
    many = est.result(jax.jit(est.update_many)(est.init(), stack, stack_masks))
    for key in plain:
        np.testing.assert_allclose(many[key], plain[key], rtol=1e-6)


def test_partial_group_is_ignored_but_its_entropy_counts():
    rng = np.random.default_rng(2)
    entries = [random_probs(rng, 6, 5) for _ in range(25)]
    est = GroupedStddev(num_classes=5, entries_per_group=10)
    full = est.result(run_stream(est, entries))
    first_two_groups = est.result(run_stream(est, entries[:20]))
    assert full["groups"] == first_two_groups["groups"] == 2
    assert full["tstddev"] == first_two_groups["tstddev"]
    np.testing.assert_allclose(full["tstddev"], numpy_tstddev(numpy_group_means(entries, 10)), rtol=1e-5)
    # The entropy is cumulative over every row seen, the unfinished group included (docs/fidelity.md, "T. stddev").
    all_rows = np.concatenate(entries).astype(np.float64)
    np.testing.assert_allclose(full["mean_entropy"], scipy.special.entr(all_rows).sum(1).mean(), rtol=1e-5)
    assert full["mean_entropy"] != first_two_groups["mean_entropy"]


def test_undefined_results_are_nan():
    est = GroupedStddev(num_classes=3, entries_per_group=1)
    out = est.result(est.init())
    assert out["groups"] == 0 and np.isnan(out["tstddev"]) and np.isnan(out["mean_entropy"])
    state = est.update(est.init(), np.full((2, 3), 1 / 3, np.float32))
    out = est.result(state)
    assert out["groups"] == 1 and np.isnan(out["tstddev"]) and np.isnan(out["tstddev_se"])
    np.testing.assert_allclose(out["mean_entropy"], np.log(3), rtol=1e-6)


def test_entropy_with_exact_zeros():
    # One-hot and partly-zero rows: 0 log 0 = 0, so the entropy stays finite and matches the formula.
    probs = np.array([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]], np.float32)
    mask = np.array([True, True, True, False])
    est = GroupedStddev(num_classes=4, entries_per_group=2)
    state = est.update(est.init(), probs, mask)
    state = jax.jit(est.update)(state, probs)
    expected = np.concatenate([-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
                               for p in (probs[:3].astype(np.float64), probs.astype(np.float64))])
    out = est.result(state)
    np.testing.assert_allclose(out["mean_entropy"], expected.mean(), rtol=1e-6)
    assert int(state.entropy_rows) == 7 and out["groups"] == 1


def test_float32_accuracy_over_100k_groups():
    """10^5 groups pooled from 2 entries of 3 rows each, in float32, against the float64 formula."""
    rng = np.random.default_rng(3)
    groups, per_group, rows, classes = 100_000, 2, 3, 10
    # Probabilities near 1/C with a small spread: the hard case for a float32 variance (mean/std ~ 20).
    probs = (0.1 + 0.004 * rng.gamma(2.0, 1.0, size=(groups * per_group, rows, classes))).astype(np.float32)
    est = GroupedStddev(num_classes=classes, entries_per_group=per_group)
    state = jax.jit(est.update_many)(est.init(), probs)
    out = est.result(state)
    means = probs.astype(np.float64).reshape(groups, per_group * rows, classes).mean(axis=1)
    assert out["groups"] == groups
    np.testing.assert_allclose(out["tstddev"], numpy_tstddev(means), rtol=1e-6)
    device = jax.jit(est.result_arrays)(state)  # the all-float32 path
    np.testing.assert_allclose(float(device["tstddev"]), numpy_tstddev(means), rtol=1e-5)
    np.testing.assert_allclose(out["tstddev_se"], numpy_jackknife_se(means, est.se_buckets), rtol=1e-3)
    np.testing.assert_allclose(float(device["tstddev_se"]), out["tstddev_se"], rtol=1e-2)
    np.testing.assert_allclose(out["mean_entropy"],
                               scipy.special.entr(probs.astype(np.float64)).sum(-1).mean(), rtol=1e-6)


@pytest.mark.parametrize("num_groups, buckets", [(12, 16), (16, 16), (203, 16)])
def test_standard_error_equals_bruteforce_jackknife(num_groups, buckets):
    """G <= K: the delete-one jackknife; G > K: delete-a-bucket with round-robin buckets."""
    rng = np.random.default_rng(num_groups)
    entries = [random_probs(rng, 5, 6, sharpness=1.0) for _ in range(num_groups * 2 + 1)]
    est = GroupedStddev(num_classes=6, entries_per_group=2, se_buckets=buckets)
    out = est.result(jax.jit(est.update_many)(est.init(), np.stack(entries)))
    means = numpy_group_means(entries, 2)
    np.testing.assert_allclose(out["tstddev_se"], numpy_jackknife_se(means, buckets), rtol=1e-4)


def test_standard_error_tracks_bootstrap_and_true_sampling_error():
    """Skewed group means (Poisson-like, as for a confident teacher): the jackknife SE against a NumPy bootstrap
    over the same groups, and against the spread of the metric over independent repeats of the stream."""
    rng = np.random.default_rng(4)
    groups, classes, repeats = 800, 8, 300

    def draw(n):
        return (rng.poisson(3.0, size=(n, classes)) / 320).astype(np.float32)

    means = draw(groups)
    est = GroupedStddev(num_classes=classes, entries_per_group=1)
    se = est.result(jax.jit(est.update_many)(est.init(), means[:, None, :]))["tstddev_se"]

    boot = []
    for _ in range(10):  # 1000 resamples in chunks, to bound memory
        idx = rng.integers(0, groups, size=(100, groups))
        boot.append(means.astype(np.float64)[idx].std(axis=1, ddof=1).mean(axis=1))
    boot_se = np.concatenate(boot).std(ddof=1)
    true_se = np.array([numpy_tstddev(draw(groups).astype(np.float64)) for _ in range(repeats)]).std(ddof=1)
    assert abs(se / boot_se - 1) < 0.2, (se, boot_se)
    assert abs(se / true_se - 1) < 0.3, (se, true_se)


def test_bad_inputs_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="entries_per_group"):
        GroupedStddev(num_classes=10, entries_per_group=0)
    with pytest.raises(ValueError, match="se_buckets"):
        GroupedStddev(num_classes=10, se_buckets=1)
    with pytest.raises(ValueError, match="dtype"):
        GroupedStddev(num_classes=10, dtype=jnp.int32)
    est = GroupedStddev(num_classes=10)
    with pytest.raises(ValueError, match=r"C = 10"):
        est.update(est.init(), np.zeros((4, 9), np.float32))
    with pytest.raises(ValueError, match="mask must have shape"):
        est.update(est.init(), np.zeros((4, 10), np.float32), np.ones(5, bool))
    with pytest.raises(ValueError, match=r"\[E, rows, C\]"):
        est.update_many(est.init(), np.zeros((4, 10), np.float32))

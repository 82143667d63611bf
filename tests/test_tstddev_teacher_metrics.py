"""The teacher-side metrics beside T. stddev (kdjax.tstddev.teacher_metrics): ECE, class-histogram entropy and
student agreement on the augmented data, against NumPy references written out from their textbook definitions.

The evaluator test repeats the procedure of tests/test_tstddev_evaluator.py (same tiny model and data) batch by
batch: the teacher on x', each mixed image's dominant label read off the scheme's own draws (lam, the partner), the
student run on x' itself rather than taken from its scoring pass.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import augment
from kdjax.augment import transforms
from kdjax.checkpoint import save_model
from kdjax.tstddev import evaluator as te
from kdjax.tstddev.teacher_metrics import ECE_BINS, AugmentedMetrics, bin_edges
from test_tstddev_evaluator import (BATCH, EPOCHS, IMAGE_SIZE, NUM_CLASSES, TINY, _evaluator, _run,
                                    _schemes, setup)  # noqa: F401  (setup: the module fixture)


def ece_reference(probs, labels, bins=ECE_BINS):
    """Guo et al.'s ECE: sum over equal-width bins (lower, upper] of |bin| / n * |accuracy - mean confidence|, the
    edges as float32 (torch.linspace), the comparisons on float32 confidences."""
    probs = np.asarray(probs, np.float32)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1).astype(np.float32)
    ece = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if lower == 0:
            in_bin |= confidence == 0
        if in_bin.any():
            accuracy = (predicted[in_bin] == labels[in_bin]).mean()
            ece += in_bin.mean() * abs(accuracy - confidence[in_bin].astype(np.float64).mean())
    return ece


def histogram_entropy_reference(predicted, num_classes):
    share = np.bincount(predicted, minlength=num_classes) / len(predicted)
    share = share[share > 0]
    return float(-(share * np.log(share)).sum())


def _random_probs(rng, rows, classes, scale=3.0):
    logits = scale * rng.normal(size=(rows, classes))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------- accumulator


def test_accumulator_matches_the_reference_on_the_same_probabilities():
    rng = np.random.default_rng(0)
    classes = 7
    metrics = AugmentedMetrics(classes)
    state = metrics.init()
    update = jax.jit(metrics.update)
    kept_probs, kept_labels, kept_student = [], [], []
    for rows in (13, 40, 1, 25):
        probs = _random_probs(rng, rows, classes, scale=rng.uniform(0.5, 4))
        # edge cases: a uniform row (confidence 1/C on a bin edge region, argmax tie), a one-hot row (confidence 1)
        probs[0] = 1.0 / classes
        if rows > 1:
            probs[1] = np.eye(classes, dtype=np.float32)[3]
        labels = rng.integers(0, classes, rows).astype(np.int32)
        student = rng.integers(0, classes, rows).astype(np.int32)
        mask = rng.random(rows) < 0.8
        padded = np.where(mask[:, None], probs, np.nan).astype(np.float32)  # masked rows may hold anything
        state = update(state, padded, labels, mask, student, np.ones(rows, bool))
        kept_probs.append(probs[mask])
        kept_labels.append(labels[mask])
        kept_student.append(student[mask])
    probs, labels, student = (np.concatenate(v) for v in (kept_probs, kept_labels, kept_student))

    got = metrics.result(state)
    assert got["aug_rows"] == len(labels)
    np.testing.assert_allclose(got["ece"], ece_reference(probs, labels), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["aug_top1"], (probs.argmax(1) == labels).mean(), rtol=1e-12)
    np.testing.assert_allclose(got["class_histogram_entropy"],
                               histogram_entropy_reference(probs.argmax(1), classes), rtol=1e-12)
    np.testing.assert_allclose(got["agreement"], (probs.argmax(1) == student).mean(), rtol=1e-12)
    device = jax.jit(metrics.result_arrays)(state)
    for field in ("ece", "aug_top1", "class_histogram_entropy", "agreement"):
        np.testing.assert_allclose(float(device[field]), got[field], rtol=1e-5, err_msg=field)


def test_bins_follow_the_rounded_edges():
    edges = bin_edges(ECE_BINS)
    # float32(0.2) * 15 rounds to 3.0: a ceil-based index would put the confidence 0.2 one bin too low or high
    conf = jnp.asarray([edges[3], np.nextafter(edges[3], np.float32(1)), 1.0, 0.0, 1e-9], jnp.float32)
    from kdjax.tstddev.teacher_metrics import confidence_bins
    assert confidence_bins(conf, ECE_BINS).tolist() == [2, 3, 14, 0, 0]


def test_metric_values_on_a_hand_made_case():
    metrics = AugmentedMetrics(3)
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]], np.float32)
    state = metrics.update(metrics.init(), probs, np.array([0, 0, 2, 0]))
    got = metrics.result(state)
    # bins: 0.9 -> (0.867, 0.933], 0.8 -> (0.733, 0.8], 0.4 -> (0.333, 0.4], 0.6 -> (0.533, 0.6]; correct 1, 0, 1, 1
    np.testing.assert_allclose(got["ece"], (0.1 + 0.8 + 0.6 + 0.4) / 4, rtol=1e-6)
    np.testing.assert_allclose(got["class_histogram_entropy"], -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert got["aug_top1"] == 0.75 and got["agreement"] is None and got["aug_rows"] == 4
    one_class = metrics.result(metrics.update(metrics.init(), probs[:1], np.array([0])))
    assert one_class["class_histogram_entropy"] == 0.0 and math.copysign(1, one_class["class_histogram_entropy"]) > 0


def test_accumulator_rejects_bad_shapes():
    metrics = AugmentedMetrics(3)
    with pytest.raises(ValueError, match="C = 3"):
        metrics.update(metrics.init(), np.zeros((2, 4)), np.zeros(2, int))
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.update(metrics.init(), np.zeros((2, 3)), np.zeros(3, int))
    with pytest.raises(ValueError, match="bins must be an integer"):
        AugmentedMetrics(3, bins=0)


@pytest.mark.parametrize("lam, want", [(0.7, [1, 2, 0]), (0.3, [2, 0, 1]), (0.5, [1, 0, 0])])
def test_dominant_label_of_a_mix(lam, want):
    """Mixup/CutMix: the batch's own label when its weight lam >= 0.5, else the partner's; at 0.5 exactly the
    lower class index."""
    labels = jnp.asarray([1, 2, 0])
    aux = {"lam": jnp.float32(lam), "perm": jnp.asarray([1, 2, 0])}
    assert transforms.dominant_labels(aux, labels, 3, 3).tolist() == want


def test_dominant_label_of_cutmix_pick_rows():
    labels = jnp.asarray([4, 1, 3])
    aux = {"picked": jnp.asarray([5, 0]), "source": jnp.asarray([2, 0]), "partner": jnp.asarray([0, 1]),
           "lam": jnp.asarray([0.2, 0.9])}
    aux["targets"] = transforms.mix_labels(labels, aux["partner"], aux["lam"], 5, source=aux["source"])
    assert transforms.dominant_labels(aux, labels, 5, 2).tolist() == [4, 4]
    assert transforms.dominant_labels({}, labels, 5, 3).tolist() == [4, 1, 3]  # label-preserving


# --------------------------------------------------------------------------------------------- evaluator

NAMES = ["identity", "mixup", "cutmix_pick_t", "cutmix_pick_s"]  # CutMix labels as Mixup: lam and perm


def _dominant_reference(aux, labels):
    """The dominant label from the scheme's draws, written independently of mixed_targets."""
    aux = {k: np.asarray(v) for k, v in aux.items() if k in ("lam", "perm", "source", "partner")}
    if "source" in aux:
        own, other, lam = labels[aux["source"]], labels[aux["partner"]], aux["lam"]
    elif "lam" in aux:
        own, other, lam = labels, labels[aux["perm"]], np.broadcast_to(aux["lam"], labels.shape)
    else:
        return labels
    return np.where(lam > 0.5, own, np.where(lam < 0.5, other, np.minimum(own, other)))


def reference_rows(setup, name, seed=0):  # noqa: F811  (setup: the fixture)
    """Every row of x' the run sees: (teacher probabilities, dominant labels, the student's argmax on x')."""
    ds, model = setup["dataset"], setup["model"]
    tv, sv = setup["teacher_vars"], setup["student_vars"]
    scheme = _schemes(ds, [name])[0]
    keys = te.run_keys(seed)
    pad = transforms.default_pad(IMAGE_SIZE)
    score_fn = {"teacher": lambda pool: (augment.entropy(model.apply(tv, pool, train=False)), None),
                "student": lambda pool: (augment.entropy(model.apply(sv, pool, train=False)), None),
                None: None}[scheme.scorer]

    @jax.jit
    def one_step(base_key, aug_key, images, labels):
        x = transforms.normalize(transforms.base_train_transform(base_key, images, pad), ds.mean, ds.std)
        x_aug, aux = scheme(aug_key, x, labels, score_fn)
        aux = {k: v for k, v in aux.items() if k in ("lam", "perm", "source", "partner")}
        return (jax.nn.softmax(model.apply(tv, x_aug, train=False), axis=-1),
                jnp.argmax(model.apply(sv, x_aug, train=False), axis=-1), aux)

    probs, labels_aug, student = [], [], []
    step = 0
    for epoch in range(EPOCHS):
        perm = np.asarray(te.epoch_permutation(keys["perm"], epoch, ds.num_train))
        for start in range(0, ds.num_train, BATCH):
            idx = perm[start:start + BATCH]
            p, s, aux = one_step(te.base_step_key(keys["base"], step), te.scheme_step_key(keys["aug"], name, step),
                                 jnp.asarray(ds.train_images[idx]), jnp.asarray(ds.train_labels[idx]))
            probs.append(np.asarray(p))
            labels_aug.append(_dominant_reference(aux, np.asarray(ds.train_labels[idx])))
            student.append(np.asarray(s))
            step += 1
    return np.concatenate(probs), np.concatenate(labels_aug), np.concatenate(student)


@pytest.fixture(scope="module")
def run_all(setup):  # noqa: F811
    return _run(setup, _evaluator(setup, NAMES))


@pytest.mark.parametrize("name", NAMES)
def test_evaluator_metrics_match_the_step_by_step_reference(setup, run_all, name):  # noqa: F811
    probs, labels, student = reference_rows(setup, name)
    got = run_all["results"][name]
    assert got["aug_rows"] == len(labels) == len(probs)
    np.testing.assert_allclose(got["ece"], ece_reference(probs, labels), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["aug_top1"], (probs.argmax(1) == labels).mean(), rtol=1e-12)
    np.testing.assert_allclose(got["class_histogram_entropy"],
                               histogram_entropy_reference(probs.argmax(1), NUM_CLASSES), rtol=1e-12)
    if name == "cutmix_pick_s":
        np.testing.assert_allclose(got["agreement"], (probs.argmax(1) == student).mean(), rtol=1e-12)
        assert 0 < got["agreement"] < 1
    else:
        assert got["agreement"] is None
    # mixing changes the labels: a teacher scored against the batch's own labels would be another number
    assert 0 < got["ece"] < 1


def test_rows_are_every_augmented_row_once(run_all):
    # 6 full steps of 16 and a short one of 4 per epoch; CutMixPick keeps min(16, 2 x 4) = 8 of the short batch
    plain, picked = EPOCHS * (6 * BATCH + 4), EPOCHS * (6 * BATCH + 8)
    assert [run_all["results"][n]["aug_rows"] for n in NAMES] == [plain, plain, picked, picked]


# --------------------------------------------------------------------------------------------- task


def test_task_writes_the_metrics_per_scheme(setup, tmp_path):  # noqa: F811
    """The 'tstddev' task on the tiny model (CutMixPick by a student): results.json and the table carry the
    metrics the run returns."""
    from helpers import load_config

    from kdjax.tasks import tstddev as task

    ds = setup["dataset"]
    meta = {"model": TINY, "num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE, "dataset": "synthetic",
            "mean": list(ds.mean), "std": list(ds.std)}
    save_model(str(tmp_path / "teacher"), setup["teacher_vars"], meta)
    save_model(str(tmp_path / "student"), setup["student_vars"], meta)
    config = load_config("tstddev")
    # 6 steps of 16, no short batch, one forward per dispatch: one small program to compile
    config.update(dict(teacher=TINY, dataset="synthetic", image_size=IMAGE_SIZE, aug="cutmix_pick_s", epochs=1,
                       batch_size=BATCH, teacher_checkpoint=str(tmp_path / "teacher"),
                       student_checkpoint=str(tmp_path / "student"), steps_per_forward=6, steps_per_dispatch=6))
    config.dataset_options.update(dict(num_classes=NUM_CLASSES, num_train=6 * BATCH, num_test=4))
    returned = task.run(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "results.json") as f:
        record = json.load(f)
    for field in ("ece", "aug_top1", "class_histogram_entropy", "agreement", "aug_rows"):
        assert record[field] == returned["cutmix_pick_s"][field], field
    assert record["aug_rows"] == 6 * BATCH and 0 < record["agreement"] < 1
    table = (tmp_path / "run" / "tstddev.md").read_text()
    assert (f"| {record['mean_entropy']:.6f} | {record['ece']:.6f} | {record['class_histogram_entropy']:.6f} | "
            f"{record['agreement']:.4f} | {record['aug_top1']:.4f} |") in table


@pytest.mark.slow
def test_eight_devices_give_the_same_metrics(run_all):
    """The metric states are replicated like the T. stddev states: a mesh of 8 (fake CPU) devices gives the same
    values as one."""
    from test_tstddev_evaluator import results_on_eight_devices
    payload = results_on_eight_devices("M.NAMES", num_test=4)
    for name, got in payload.items():
        want = run_all["results"][name]
        assert (got["aug_rows"], got["agreement"] is None) == (want["aug_rows"], want["agreement"] is None)
        for field in ("ece", "aug_top1", "class_histogram_entropy", "agreement"):
            if want[field] is not None:
                np.testing.assert_allclose(got[field], want[field], rtol=1e-5, err_msg=f"{name} {field}")

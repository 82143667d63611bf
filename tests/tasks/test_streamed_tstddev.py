"""T. stddev over the streamed train set, through the command line: the nine schemes on ImageNet-100-format records
prepared from fabricated ILSVRC tars (5 of the original's 100 classes, 30 train images, 16 px), checked against a
step-by-step recomputation in NumPy from the teacher's per-image probabilities of the same host-cropped batches;
with tiny_cnn as teacher in the default suite, with the ImageNet zoo's resnet18_imagenet (random weights) behind
``slow`` (its nine-scheme programs take minutes to compile on 2 cores); and over 4 devices (padded, masked
batches) equal to one device (slow)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import streamed_inputs as fab
import tiny_models  # noqa: F401  (registers tiny_cnn, the fixed student of CutMixPick S. ent.)
from helpers import launch
from kdjax import augment, cli, models
from kdjax.augment import transforms
from kdjax.checkpoint import save_model
from kdjax.data.streamed import IMAGENET100_CLASSES, ProcessShare, StreamedDataset, dataset_root
from kdjax.tstddev import evaluator as te
from test_tstddev_evaluator import _variables

SIZE, BATCH, EPOCHS, SEED = 16, 8, 3, 3
STUDENT = "tiny_cnn"
TEACHERS = [pytest.param("tiny_cnn"), pytest.param("resnet18_imagenet", marks=pytest.mark.slow)]
CLASSES = sorted(IMAGENET100_CLASSES[::20])  # 5 classes of ImageNet-100


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streamed_tstddev")
    manual = fab.write_tars(tmp / "manual", fab.make_images(seed=11, wnids=CLASSES))
    data_dir = tmp / "data"
    cli.main(["prepare_data", "--config.dataset=imagenet100", f"--config.manual_dir={manual}", "--config.workers=1",
              "--config.records_per_shard=16", f"--config.classes={','.join(CLASSES)}", f"--config.data_dir={data_dir}",
              f"--workdir={tmp / 'prepare'}"])
    dataset = StreamedDataset.open(dataset_root(data_dir, "imagenet100"), image_size=SIZE)
    meta = {"num_classes": len(CLASSES), "image_size": SIZE, "dataset": "imagenet100", "mean": list(dataset.mean),
            "std": list(dataset.std)}
    save_model(str(tmp / "student"), _variables(3, SIZE, len(CLASSES), STUDENT), {**meta, "model": STUDENT})
    return {"tmp": tmp, "dataset": dataset, "meta": meta, "data_dir": data_dir}


def with_teacher(prepared, teacher: str) -> dict:
    """A teacher checkpoint of random weights, and the command-line fields of a run with it."""
    tmp = prepared["tmp"]
    teacher_vars = _variables(2, SIZE, len(CLASSES), teacher)
    save_model(str(tmp / teacher), teacher_vars, {**prepared["meta"], "model": teacher})
    args = [f"--config.teacher_checkpoint={tmp / teacher}", f"--config.student_checkpoint={tmp / 'student'}",
            f"--config.data_dir={prepared['data_dir']}", f"--config.batch_size={BATCH}", f"--config.epochs={EPOCHS}",
            f"--config.seed={SEED}"]
    return {**prepared, "teacher": teacher, "teacher_vars": teacher_vars, "args": args}


def results(workdir) -> dict:
    return {name: json.loads((workdir / name / "results.json").read_text()) for name in augment.PAPER_SCHEMES}


def numpy_tstddev(entries) -> tuple[float, float]:
    """The original's metric from its definition: every 10 entries (5 steps of x, x') pooled into one group mean
    (all rows weigh the same), the unbiased std over the groups averaged over classes; the mean row entropy."""
    groups = [np.concatenate(entries[i:i + 10]).mean(axis=0) for i in range(0, len(entries) - 9, 10)]
    rows = np.concatenate(entries)
    entropy = -np.sum(rows * np.log(np.where(rows > 0, rows, 1.0)), axis=1).mean()
    return float(np.std(np.stack(groups), axis=0, ddof=1).mean()), float(entropy)


def reference(prepared, names):
    """Each scheme's T. stddev recomputed step by step: the host batches the source yields for this seed (every
    image once per epoch), the teacher's probabilities of x computed here from its forward, those of x' from the
    evaluator's one-step function with the scheme's key of that step, grouped and reduced in NumPy."""
    dataset, teacher_vars = prepared["dataset"], prepared["teacher_vars"]
    plan = te.make_plan(dataset.num_train, BATCH, EPOCHS)
    steps = dataset.train_steps(plan.epoch, EPOCHS, te.streamed_host_seed(SEED), ProcessShare(0, 1))
    teacher = models.create(prepared["teacher"], dataset.num_classes, SIZE)
    student = models.create(STUDENT, dataset.num_classes, SIZE)
    schemes = [augment.create(name, dataset_stats=dataset, **augment.options_from_config(
        augment.config_block(exclude=("criterion",)), BATCH), criterion="entropy") for name in names]
    step_probs = jax.jit(te.make_step_probs(teacher, schemes, mean=dataset.mean, std=dataset.std, pad=0,
                                            student=student, host_crop=True))
    forward = jax.jit(lambda images: jax.nn.softmax(teacher.apply(
        teacher_vars, transforms.normalize(images, dataset.mean, dataset.std), train=False).astype(jnp.float32)))
    student_vars = _variables(3, SIZE, dataset.num_classes, STUDENT)
    aug_key = te.run_keys(SEED)["aug"]
    entries = {name: [] for name in names}
    for t in range(plan.total_steps):
        batch = steps[t]
        if t % plan.steps_per_epoch == 0:
            seen = []
        seen += batch["indices"].tolist()
        if t % plan.steps_per_epoch == plan.steps_per_epoch - 1:
            assert sorted(seen) == list(range(dataset.num_train))  # every image once per epoch
        keys = jnp.stack([te.scheme_step_key(aug_key, name, t) for name in names])
        probs_x, probs_aug, _, _ = step_probs(teacher_vars, student_vars, batch["images"], batch["labels"],
                                              jax.random.key(0), keys)
        mine = np.asarray(forward(batch["images"]), np.float64)
        np.testing.assert_allclose(np.asarray(probs_x), mine, atol=1e-6)
        for name, p in zip(names, probs_aug):
            entries[name] += [mine, np.asarray(p, np.float64)]
    return {name: numpy_tstddev(e) for name, e in entries.items()}


@pytest.mark.parametrize("teacher", TEACHERS)
def test_nine_schemes_over_the_streamed_train_set_equal_a_numpy_recomputation(prepared, teacher, capsys):
    prepared = with_teacher(prepared, teacher)
    workdir = prepared["tmp"] / f"tstddev_{teacher}"
    cli.main(["tstddev", "--config.aug=all", *prepared["args"], f"--workdir={workdir}"])
    got = results(workdir)
    assert "(streamed)" in capsys.readouterr().out
    plan = te.make_plan(30, BATCH, EPOCHS)
    assert (plan.full_steps, plan.short_batch) == (3, 6)  # the short last batch is kept
    expected = reference(prepared, list(augment.PAPER_SCHEMES))
    for name, (tstddev, entropy) in expected.items():
        r = got[name]
        assert (r["dataset"], r["teacher"], r["groups"]) == ("imagenet100", teacher, plan.expected_groups())
        assert r["tstddev"] == pytest.approx(tstddev, rel=2e-5), name
        assert r["mean_entropy"] == pytest.approx(entropy, rel=2e-5), name
    # the schemes differ from each other (a run that fed every scheme the same x' would not)
    assert len({round(r["tstddev"], 7) for r in got.values()}) >= 6


@pytest.mark.slow
def test_four_devices_with_padded_batches_equal_one_device(prepared):
    """8-row batches and a 6-row last batch over 4 devices: the host pads the last to 8 rows and masks the
    padding; the values equal the single-device run's."""
    prepared = with_teacher(prepared, "tiny_cnn")
    one, four = prepared["tmp"] / "one", prepared["tmp"] / "four"
    cli.main(["tstddev", "--config.aug=cutmix_pick_t", *prepared["args"], f"--workdir={one}"])
    launch("tstddev.py", four, "--config.aug=cutmix_pick_t", *prepared["args"], devices=4)
    a, b = (json.loads((w / "results.json").read_text()) for w in (one, four))
    for key in ("tstddev", "mean_entropy", "ece", "aug_top1"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert (a["groups"], a["aug_rows"]) == (b["groups"], b["aug_rows"])

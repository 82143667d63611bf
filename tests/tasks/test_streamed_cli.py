"""ImageNet-format data end to end through the command line, on the streamed path: ``kdjax prepare_data`` on
fabricated ILSVRC tars (5 classes, 30 train / 10 test JPEGs), a teacher, a KD student with CutMixPick (T. ent.),
and ``kdjax evaluate`` of that student (tiny_cnn at 16 px, one epoch each)."""
import json

import numpy as np
import pytest

import streamed_inputs as fab
import tiny_models  # noqa: F401  (registers tiny_cnn)
from kdjax import cli

SMALL = ["--config.image_size=16", "--config.batch_size=8", "--config.epochs=1", "--config.eval_batch_size=4"]


def results(workdir) -> dict:
    return json.loads((workdir / "results.json").read_text())


def test_prepare_teacher_distill_with_cutmix_pick_and_evaluate(tmp_path, capsys):
    manual = fab.write_tars(tmp_path / "manual", fab.make_images(seed=5))
    data = [f"--config.data_dir={tmp_path / 'data'}"]
    cli.main(["prepare_data", "--config.dataset=imagenet", f"--config.manual_dir={manual}", "--config.workers=1",
              "--config.records_per_shard=16", f"--config.classes={','.join(fab.classes())}", *data,
              f"--workdir={tmp_path / 'prepare'}"])
    assert (results(tmp_path / "prepare")["train"], results(tmp_path / "prepare")["test"]) == (30, 10)

    cli.main(["teacher", "--config.model=tiny_cnn", "--config.dataset=imagenet", "--config.optim.lr=0.1", *SMALL,
              *data, f"--workdir={tmp_path / 'teacher'}"])
    teacher = results(tmp_path / "teacher")
    assert teacher["dataset"] == "imagenet" and np.isfinite(teacher["test_loss"])
    assert "streamed on" in capsys.readouterr().out

    # dataset and image size come from the teacher's checkpoint
    cli.main(["distill", "--config.student=tiny_cnn", f"--config.teacher_checkpoint={tmp_path / 'teacher'}",
              "--config.aug=cutmix_pick_t", *SMALL[1:], *data, f"--workdir={tmp_path / 'student'}"])
    student = results(tmp_path / "student")
    assert (student["dataset"], student["aug"], student["teacher"]) == ("imagenet", "cutmix_pick_t", "tiny_cnn")
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    kd_rows = [r for r in rows if "kl_aug" in r]
    assert [r["step"] for r in kd_rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in kd_rows)

    cli.main(["evaluate", f"--config.checkpoint={tmp_path / 'student'}", "--config.eval_batch_size=3", *data,
              f"--workdir={tmp_path / 'evaluate'}"])
    evaluated = results(tmp_path / "evaluate")
    # another batch size (a padded last batch of 1 image instead of 2): the same figures as the run's own evaluation
    assert evaluated["dataset"] == "imagenet"
    assert evaluated["test_loss"] == pytest.approx(student["test_loss"], rel=1e-6)
    assert (evaluated["top1"], evaluated["top5"]) == (student["top1"], student["top5"])


def test_a_dataset_not_prepared_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["teacher", "--config.model=tiny_cnn", "--config.dataset=imagenet100", *SMALL,
                  f"--config.data_dir={tmp_path / 'empty'}", f"--workdir={tmp_path / 'run'}"])
    assert exit_.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "imagenet100" in errors[0] and "prepare_data" in errors[0]


def test_crd_on_streamed_records_uses_their_labels_and_indices(tmp_path):
    """CRD's class tables come from the manifest's per-class counts (equal to the labels the records hold) and its
    memory banks from the indices every streamed batch carries: a distill run on the streamed path runs it."""
    from kdjax.checkpoint import save_model
    from kdjax.data.streamed import StreamedDataset, dataset_root
    from kdjax.data.streamed.records import decode_record
    from test_tstddev_evaluator import _variables
    import grain

    manual = fab.write_tars(tmp_path / "manual", fab.make_images(seed=7))
    data = [f"--config.data_dir={tmp_path / 'data'}"]
    cli.main(["prepare_data", "--config.dataset=imagenet", f"--config.manual_dir={manual}", "--config.workers=1",
              "--config.records_per_shard=16", f"--config.classes={','.join(fab.classes())}", *data,
              f"--workdir={tmp_path / 'prepare'}"])
    dataset = StreamedDataset.open(dataset_root(tmp_path / "data", "imagenet"), image_size=16)
    source = grain.sources.ArrayRecordDataSource([str(p) for p in dataset.manifest.paths("train")])
    held = [decode_record(source[i])[1:] for i in range(len(source))]
    assert [index for _, index in held] == list(range(30))
    np.testing.assert_array_equal(dataset.train_labels, [label for label, _ in held])
    assert np.bincount(dataset.train_labels).tolist() == [6] * 5

    meta = {"model": "tiny_cnn", "num_classes": 5, "image_size": 16, "dataset": "imagenet",
            "mean": list(dataset.mean), "std": list(dataset.std)}
    save_model(str(tmp_path / "teacher"), _variables(2, 16, 5, "tiny_cnn"), meta)
    cli.main(["distill", "--config.student=tiny_cnn", f"--config.teacher_checkpoint={tmp_path / 'teacher'}",
              "--config.distiller=crd", "--config.distill.nce_k=8", "--config.distill.feat_dim=8",
              "--config.aug=identity", *SMALL[1:], "--config.epochs=2", *data, f"--workdir={tmp_path / 'student'}"])
    student = results(tmp_path / "student")
    assert (student["dataset"], student["distiller"]) == ("imagenet", "crd")
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    terms = [r["distill"] for r in rows if "distill" in r]
    assert len(terms) == 8 and all(np.isfinite(terms))

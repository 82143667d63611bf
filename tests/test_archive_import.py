"""Teacher archives in one command: ``import_torch`` of a ``cifar_teachers.tar`` (or RepDistiller's ``save/models``
directory) imports every teacher into ``<workdir>/<model>/``, and the sweep takes them with ``teacher_dir``.

The archives are fabricated here from the committed teacher fixtures (resnet8 and wrn_16_1, randomly initialised
by the original code under torch, fixtures/make_parity_files.py), laid out as mdistiller's tar, plus the files
that must be left out: an earlier epoch, ``_best`` copies, a model outside the zoo, a README.
"""
import hashlib
import io
import json
import os
import pathlib
import tarfile

import numpy as np
import pytest

from conftest import FIXTURES
from helpers import load_config
from kdjax import models
from kdjax.checkpoint import archive_import, load_model, read_meta
from kdjax.configs.sweep import sweep_config
from kdjax.sweep import grid

GOOD = {"cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth": FIXTURES / "resnet8_c100_s32.pth",
        "cifar_teachers/wrn_16_1_vanilla/ckpt_epoch_240.pth": FIXTURES / "wrn_16_1_c100_s32_legacy.pth"}
LEFT_OUT = {"cifar_teachers/resnet8_vanilla/ckpt_epoch_40.pth": FIXTURES / "resnet8_c100_s32_legacy.pth",
            "cifar_teachers/resnet8_vanilla/resnet8_best.pth": FIXTURES / "resnet8_c100_s32_legacy.pth",
            "cifar_teachers/resnet8_aug/ckpt_epoch_240.pth": FIXTURES / "resnet8_c100_s32.pth",
            "cifar_teachers/resnet1202_vanilla/ckpt_epoch_240.pth": FIXTURES / "resnet8_c100_s32.pth",
            "cifar_teachers/README": None}


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def make_tar(path, members) -> str:
    with tarfile.open(path, "w") as tar:
        for name, source in members.items():
            data = b"see the README of mdistiller\n" if source is None else pathlib.Path(source).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def run_import(source, workdir, **fields):
    from kdjax.tasks import import_torch
    config = load_config("import_torch")
    config.source = str(source)
    for key, value in fields.items():
        config[key] = value
    return import_torch.run(config, str(workdir))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    tar = make_tar(root / "cifar_teachers.tar", dict(GOOD, **LEFT_OUT))
    return tar, root / "teachers", run_import(tar, root / "teachers", data_dir=str(root / "no_data"))


def test_every_teacher_of_the_tar_becomes_a_finished_workdir(imported, capsys):
    tar, teachers, rows = imported
    assert [(r["model"], r["status"], r["epoch"], r["classes"]) for r in rows] == [
        ("resnet8", "imported", 240, 100), ("wrn_16_1", "imported", 240, 100)]
    for row, fixture in zip(rows, GOOD.values()):
        workdir = teachers / row["model"]
        results = json.loads((workdir / "results.json").read_text())
        assert results["source_sha256"] == sha256(fixture)
        assert results["source"] == f"{os.path.abspath(tar)}:{row['file']}"
        assert results["digest"] == read_meta(str(workdir))["digest"]
        assert results["model"] == row["model"] and results["accuracy"] == pytest.approx(row["top1"])
    # the archive's resnet8 gives the original's logits (the fixture's stored forward)
    variables, meta = load_model(str(teachers / "resnet8"))
    io_ = np.load(FIXTURES / "resnet8_c100_s32_io.npz")
    logits = models.create("resnet8", 100).apply(variables, np.transpose(io_["input_nchw"], (0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(logits), io_["logits"], atol=1e-4 * max(1.0, np.abs(io_["logits"]).max()))


def test_the_table_lists_the_teachers_and_every_file_left_out(tmp_path, capsys):
    tar = make_tar(tmp_path / "t.tar", dict(GOOD, **LEFT_OUT))
    rows = run_import(tar, tmp_path / "teachers", data_dir=str(tmp_path / "no_data"))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["model", "classes", "epoch", "stored", "top-1", "test"]
    assert lines[1].split()[:3] == ["resnet8", "100", "240"] and lines[2].split()[:3] == ["wrn_16_1", "100", "240"]
    for name in LEFT_OUT:
        assert name in out
    assert "an earlier epoch of resnet8" in out and "no zoo model 'resnet1202'" in out
    assert "--config.teacher_dir=" in out
    # cifar100 is not under data_dir: '-' in the test top-1 column, and one line saying how to get it
    assert [r.get("test_top1") for r in rows] == [None, None]
    stored = f"{rows[0]['top1']:.2f}"
    assert lines[1].split()[3:5] == [stored, "-"]
    note = [line for line in lines if line.startswith("test top-1 not evaluated")]
    assert len(note) == 1 and f"cifar100 is not prepared in {tmp_path / 'no_data'}" in note[0]
    assert "--config.data_dir=DIR" in note[0] and "kdjax evaluate --config.checkpoint=" in note[0]


def evaluate_teacher(teacher_dir, workdir, **dataset_options):
    """``kdjax evaluate`` of one imported teacher on the synthetic test split."""
    from kdjax.tasks import evaluate
    config = load_config("evaluate", "dataset=synthetic,eval_batch_size=64")
    config.checkpoint = str(teacher_dir)
    config.dataset_options.update(dataset_options)
    return evaluate.run(config, str(workdir))


def synthetic_import(tar, teachers, **dataset_options):
    from kdjax.tasks import import_torch
    config = load_config("import_torch", "dataset=synthetic,eval_batch_size=32")
    config.source = str(tar)
    config.dataset_options.update(dataset_options)
    return import_torch.run(config, str(teachers))


def test_the_table_shows_the_top1_that_evaluate_gives_when_the_dataset_is_present(imported, tmp_path, capsys):
    """The archive's teachers (100 classes, 32 px) on a present test split (synthetic at 100 classes): the
    printed top-1 is ``kdjax evaluate``'s on the same teacher (another batch size, so another batching)."""
    tar, teachers, _ = imported
    options = dict(num_classes=100, num_train=8, num_test=300, seed=3)
    capsys.readouterr()
    rows = synthetic_import(tar, teachers, **options)  # already imported: evaluated all the same
    out = capsys.readouterr().out
    assert [r["status"] for r in rows] == ["done", "done"]
    lines = out.splitlines()
    for row, line in zip(rows, lines[1:3]):
        expected = evaluate_teacher(teachers / row["model"], tmp_path / row["model"], **options)["top1"]
        assert row["test_top1"] == expected
        assert line.split()[:5] == [row["model"], "100", "240", f"{row['top1']:.2f}", f"{100 * expected:.2f}"]
    assert "test top-1: on the 300 test images of synthetic" in out
    # the two random teachers do not agree on every image: the column is not one value printed twice
    assert rows[0]["test_top1"] != rows[1]["test_top1"] or rows[0]["test_top1"] not in (0.0, 1.0)


def test_a_dataset_of_another_class_count_is_not_evaluated_in_one_line(imported, capsys):
    tar, teachers, _ = imported
    rows = synthetic_import(tar, teachers, num_classes=10, num_train=8, num_test=16)
    out = capsys.readouterr().out
    assert [r.get("test_top1") for r in rows] == [None, None]
    note = [line for line in out.splitlines() if line.startswith("test top-1 not evaluated on synthetic")]
    assert len(note) == 1 and "num_classes" in note[0]


def test_a_second_run_keeps_what_is_imported(imported, capsys):
    tar, teachers, _ = imported
    before = (teachers / "resnet8" / "results.json").stat().st_mtime_ns
    rows = run_import(tar, teachers)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert (teachers / "resnet8" / "results.json").stat().st_mtime_ns == before


def test_repdistiller_directory_layout(tmp_path):
    save = tmp_path / "save" / "models"
    for name, source in GOOD.items():
        target = save / name.split("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pathlib.Path(source).read_bytes())
    rows = run_import(save, tmp_path / "teachers")
    assert [r["model"] for r in rows] == ["resnet8", "wrn_16_1"]
    results = json.loads((tmp_path / "teachers" / "wrn_16_1" / "results.json").read_text())
    assert results["source"] == str(save / "wrn_16_1_vanilla" / "ckpt_epoch_240.pth")
    assert results["source_sha256"] == sha256(GOOD["cifar_teachers/wrn_16_1_vanilla/ckpt_epoch_240.pth"])


def test_a_teacher_that_does_not_fit_fails_after_the_others_naming_it(tmp_path, capsys):
    members = {"t/resnet8_vanilla/ckpt_epoch_240.pth": FIXTURES / "wrn_16_1_c100_s32.pth",  # wrong weights
               "t/wrn_16_1_vanilla/ckpt_epoch_240.pth": FIXTURES / "wrn_16_1_c100_s32.pth"}
    with pytest.raises(ValueError, match=r"1 of 2 teachers did not import; first, resnet8: .*resnet8_vanilla") as e:
        run_import(make_tar(tmp_path / "t.tar", members), tmp_path / "teachers")
    assert "\n" not in str(e.value)
    assert (tmp_path / "teachers" / "wrn_16_1" / "results.json").exists()
    assert not (tmp_path / "teachers" / "resnet8" / "results.json").exists()
    assert "FAILED" in capsys.readouterr().out


def test_an_archive_without_teachers_or_a_broken_tar_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"holds no <model>_vanilla.*README \(not <model>_vanilla"):
        run_import(make_tar(tmp_path / "empty.tar", {"x/README": None}), tmp_path / "a")
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable tar archive") as e:
        run_import(tmp_path / "broken.tar", tmp_path / "b")
    assert "\n" not in str(e.value)


def test_two_files_of_one_model_and_epoch_are_refused():
    files = ["a/resnet8_vanilla/ckpt_epoch_240.pth", "b/resnet8_vanilla/ckpt_epoch_240.pth"]
    with pytest.raises(ValueError, match="two files hold resnet8 at epoch 240"):
        archive_import.find_teachers(files, models.names())


def test_the_sweep_takes_the_teachers_of_teacher_dir(imported):
    _, teachers, _ = imported
    config = sweep_config(pairs=("resnet8:resnet8", "wrn_16_1:resnet8", "resnet20:resnet8"), augs=("identity",),
                               seeds=(0,))
    config.teacher_dir = str(teachers)
    given = grid.given_teachers(config)
    assert given == {"resnet8": str(teachers / "resnet8"), "wrn_16_1": str(teachers / "wrn_16_1")}
    runs = grid.plan(config, "/tmp/sweep_root")
    assert [dict(r.fields)["model"] for r in runs if r.task == "teacher"] == ["resnet20"]  # only the missing one
    students = {dict(r.fields)["teacher"]: dict(r.fields)["teacher_checkpoint"] for r in runs if r.task == "distill"}
    assert students["resnet8"] == str(teachers / "resnet8") and students["wrn_16_1"] == str(teachers / "wrn_16_1")
    # a teacher named in teacher_checkpoints wins over teacher_dir
    config.teacher_checkpoints.resnet8 = "/elsewhere/resnet8"
    assert grid.given_teachers(config)["resnet8"] == "/elsewhere/resnet8"
    config.teacher_dir = "/no/such/dir"
    with pytest.raises(ValueError, match="teacher_dir=/no/such/dir: no such directory"):
        grid.given_teachers(config)


def test_a_single_file_import_records_the_same(tmp_path):
    """``import_torch`` of one .pth: results.json has the digest and the source's SHA-256 too."""
    source = GOOD["cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"]
    record = run_import(source, tmp_path / "t", model="resnet8")
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert results["source_sha256"] == record["source_sha256"] == sha256(source)
    assert results["digest"] == read_meta(str(tmp_path / "t"))["digest"] and results["source"] == str(source)


def test_an_unknown_dataset_or_dtype_is_refused_before_anything_is_imported(tmp_path):
    tar = make_tar(tmp_path / "t.tar", GOOD)
    with pytest.raises(ValueError, match="unknown dataset 'cifar1000'"):
        run_import(tar, tmp_path / "a", dataset="cifar1000")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        run_import(tar, tmp_path / "b", dtype="float8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

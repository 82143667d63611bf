"""A sweep counts nothing twice and rebuilds nothing silently. Old outputs set aside are not
a seed of the report; inputs are identified by content and located by the sweep's own layout, so that a moved
sweep is still finished; an input that cannot be read is an error, never a change."""
import json
import os
import shutil

import numpy as np
import pytest

from kdjax.checkpoint import read_meta, save_model
from kdjax.sweep import analysis, executor, grid


def _teacher(directory, value=1.0):
    save_model(str(directory / "checkpoints"), {"params": {"w": np.full(3, value, np.float32)}, "batch_stats": {}},
               {"model": "tiny_cnn"})
    (directory / "results.json").write_text(json.dumps({"task": "teacher", "model": "tiny_cnn"}))
    return directory


def _finished_student(root, seed=0, test_loss=2.0):
    """A finished student of the sweep in ``root`` whose results record its teacher as a task records it."""
    teacher_dir = root / "teachers" / "tiny_cnn"
    workdir = root / "tiny_cnn-tiny_cnn" / "cutmix" / f"seed{seed}"
    workdir.mkdir(parents=True)
    record = {"path": str(teacher_dir), "digest": read_meta(str(teacher_dir))["digest"]}
    (workdir / "results.json").write_text(json.dumps({
        "task": "distill", "teacher": "tiny_cnn", "student": "tiny_cnn", "aug": "cutmix", "dataset": "synthetic",
        "seed": seed, "test_loss": test_loss, "top1": 0.5, "top5": 0.9, "inputs": {"teacher": record}}))
    return grid.Run("distill", str(workdir), (("seed", seed), ("teacher_checkpoint", str(teacher_dir))), stage=2)


def test_a_set_aside_run_is_not_a_seed_of_the_report(tmp_path):
    _teacher(tmp_path / "teachers" / "tiny_cnn")
    run = _finished_student(tmp_path, test_loss=3.0)
    executor.set_aside(run, log=lambda line: None)
    _finished_student(tmp_path, test_loss=2.0)  # the rerun
    records = [r for r in analysis.collect_results(str(tmp_path)) if r["task"] == "distill"]
    assert [r["test_loss"] for r in records] == [2.0]
    assert executor.is_set_aside(str(tmp_path / "x" / "seed0.stale-1"))
    assert not executor.is_set_aside("seed0") and not executor.is_set_aside(".stale-1")


def test_a_moved_sweep_is_still_finished(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _teacher(old / "teachers" / "tiny_cnn")
    _finished_student(old)
    shutil.move(str(old), str(new))
    # the run as the sweep plans it now, from its new place: its teacher field names the moved teacher
    teacher_dir = new / "teachers" / "tiny_cnn"
    run = grid.Run("distill", str(new / "tiny_cnn-tiny_cnn" / "cutmix" / "seed0"),
                   (("seed", 0), ("teacher_checkpoint", str(teacher_dir))), stage=2)
    assert run.done and not executor.stale(run)
    out = executor.execute([run], run_task=lambda *args: pytest.fail("a finished run ran again"),
                           log=lambda line: None)
    assert out.skipped == [run] and not out.completed


def test_a_teacher_whose_content_changed_makes_its_students_stale(tmp_path):
    teacher_dir = _teacher(tmp_path / "teachers" / "tiny_cnn")
    run = _finished_student(tmp_path)
    shutil.rmtree(teacher_dir / "checkpoints")
    _teacher(teacher_dir, value=2.0)  # retrained in place
    assert executor.stale(run)


def test_an_unreadable_input_is_an_error_never_a_change(tmp_path):
    teacher_dir = _teacher(tmp_path / "teachers" / "tiny_cnn")
    run = _finished_student(tmp_path)
    meta_file = teacher_dir / "checkpoints" / "0" / "meta" / "metadata"
    saved = meta_file.read_bytes()
    meta_file.write_bytes(b"")  # briefly unreadable (a file system hiccup, a copy in progress)
    with pytest.raises(executor.InputUnreadable, match="cannot read .*an unreadable input is not a change") as err:
        executor.execute([run], run_task=lambda *args: None, log=lambda line: None)
    assert "\n" not in str(err.value)
    assert run.done and not os.path.exists(run.workdir + ".stale-1")  # nothing moved aside
    meta_file.write_bytes(saved)
    assert not executor.stale(run)


def test_an_interrupted_student_whose_teacher_changed_restarts_from_scratch(tmp_path):
    """A started, unfinished run records its inputs (inputs.json); a sweep moves it aside when its teacher changed
    since, instead of resuming it with the new teacher, and resumes it when the teacher is the same."""
    from kdjax import workdir as workdir_lib
    teacher_dir = _teacher(tmp_path / "teachers" / "tiny_cnn")
    workdir = tmp_path / "tiny_cnn-tiny_cnn" / "cutmix" / "seed0"
    workdir.mkdir(parents=True)
    (workdir / workdir_lib.INPUTS).write_text(json.dumps({"teacher": read_meta(str(teacher_dir))["digest"]}))
    run = grid.Run("distill", str(workdir), (("teacher_checkpoint", str(teacher_dir)),), stage=2)
    started = []
    executor.execute([run], run_task=lambda task, config, wd: started.append(os.listdir(wd)), log=lambda line: None)
    assert started == [[workdir_lib.INPUTS]]  # resumed in place: the same teacher
    shutil.rmtree(teacher_dir / "checkpoints")
    _teacher(teacher_dir, value=2.0)
    started.clear()
    executor.execute([run], run_task=lambda task, config, wd: started.append(os.listdir(wd)), log=lambda line: None)
    assert started == [[]] and (tmp_path / "tiny_cnn-tiny_cnn" / "cutmix" / "seed0.stale-1" / "inputs.json").exists()

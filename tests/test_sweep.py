"""Sweeps: the plan (layout, order, skipping) and the demo pipeline end to end on digits with a tiny model."""
import json
import os

import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import load_config
from kdjax import sweep


def test_plan_of_the_paper_grid():
    config = load_config("sweep", "datasets=cifar100")
    runs = sweep.plan(config, "/r")
    tasks = [r.task for r in runs]
    # 5 teachers, 5 teachers x 3 seeds T. stddev (8 schemes in one program), 9 pairs x 9 schemes x 3 seeds students,
    # 9 pairs x 3 seeds T. stddev of CutMixPick (S. ent.) with that pair's student
    assert tasks.count("teacher") == 5 and tasks.count("distill") == 243 and tasks.count("tstddev") == 15 + 27
    assert [r.stage for r in runs] == sorted(r.stage for r in runs)
    by_dir = {r.workdir: dict(r.fields) for r in runs}
    student = by_dir["/r/resnet56-resnet20/cutmix_pick_t/seed2"]
    assert student["teacher_checkpoint"] == "/r/teachers/resnet56" and student["epochs"] == 240
    cmp_s = by_dir["/r/tstddev/resnet56-resnet20/cutmix_pick_s/seed1"]
    assert cmp_s["student_checkpoint"] == "/r/resnet56-resnet20/cutmix_pick_s/seed1" and cmp_s["aug"] == "cutmix_pick_s"
    assert by_dir["/r/tstddev/vgg13/seed0"]["aug"] == "all"


def test_plan_uses_given_teachers_and_subsets_and_rejects_bad_names(tmp_path):
    config = load_config("sweep", "pairs=resnet56:resnet20,augs=cutmix+mixup,seeds=0,datasets=digits")
    config.teacher_checkpoints = "resnet56=/t/r56"
    runs = sweep.plan(config, str(tmp_path))
    assert [r.task for r in runs] == ["tstddev", "tstddev", "distill", "distill"]
    assert {dict(r.fields)["teacher_checkpoint"] for r in runs} == {"/t/r56"}
    finished = runs[2]
    os.makedirs(finished.workdir)
    open(os.path.join(finished.workdir, "results.json"), "w").write("{}")
    assert finished.done and not runs[3].done
    for arg, message in (("pairs=resnet56:resnet9", "unknown model 'resnet9'"), ("augs=cutmax", "cutmax"),
                         ("pairs=resnet56", "teacher:student")):
        with pytest.raises(ValueError, match=message):
            sweep.plan(load_config("sweep", arg + ",datasets=digits"), str(tmp_path))


def test_demo_pipeline_end_to_end(tmp_path):
    """The demo's sweep on digits, shrunk: teacher, T. stddev of the nine schemes, nine students, report."""
    from kdjax.tasks import sweep as sweep_task
    config = load_config("demo", "pairs=tiny_cnn:tiny_cnn,epochs=1,teacher_epochs=2,tstddev_epochs=1,image_size=8")
    sweep_task.run(config, str(tmp_path))
    for aug in ("identity", "cutmix_pick_s", "cutmix_pick_t"):
        assert (tmp_path / "tiny_cnn-tiny_cnn" / aug / "seed0" / "results.json").exists()
    cmp_s = json.loads((tmp_path / "tstddev/tiny_cnn-tiny_cnn/cutmix_pick_s/seed0/results.json").read_text())
    assert cmp_s["student"] == "tiny_cnn" and cmp_s["tstddev"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "tiny_cnn/tiny_cnn" in report and "Pearson" in report
    assert list((tmp_path / "plots").glob("*.png"))
    # a second run finds everything done and only rewrites the report
    before = (tmp_path / "tiny_cnn-tiny_cnn/cutmix/seed0/results.json").stat().st_mtime
    sweep_task.run(config, str(tmp_path))
    assert (tmp_path / "tiny_cnn-tiny_cnn/cutmix/seed0/results.json").stat().st_mtime == before


def test_parallel_executor_runs_launch_subprocesses(tmp_path, monkeypatch):
    """parallel=N: runs go to launch.py subprocesses, N at a time; a failing run is reported, the others finish."""
    from helpers import launch_env
    for key, value in launch_env().items():
        monkeypatch.setenv(key, value)
    common = dict(teacher="none", student="tiny_cnn", dataset="digits", epochs=1, image_size=8, batch_size=32,
                  last_batch="drop")
    runs = [sweep.Run("distill", str(tmp_path / aug), sweep.run_fields(common, aug=aug), stage=0)
            for aug in ("mixup", "cutmix")]
    runs.append(sweep.Run("distill", str(tmp_path / "bad"), sweep.run_fields(common, aug="cutmix_pick_t"), stage=0))
    failed = sweep.execute(runs, parallel=2, log=lambda line: None)
    assert [r.workdir for r in failed] == [str(tmp_path / "bad")]
    assert "needs a teacher" in (tmp_path / "bad" / "launch.log").read_text()
    for aug in ("mixup", "cutmix"):
        assert json.loads((tmp_path / aug / "results.json").read_text())["aug"] == aug

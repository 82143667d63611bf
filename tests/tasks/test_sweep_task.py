"""The sweep task: the demo pipeline end to end on digits with a tiny model, and the subprocess executor."""
import json

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import load_config
from kdjax import sweep, tasks
from kdjax.sweep import grid


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    """The demo's sweep on digits, shrunk: teacher, T. stddev of the nine schemes, nine students, report."""
    from kdjax.tasks import sweep as sweep_task
    config = load_config("demo", "pairs=tiny_cnn:tiny_cnn,epochs=1,teacher_epochs=2,tstddev_epochs=1,image_size=8")
    sweep_task.run(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "[sweep] run 1/12, ETA ?:" in out and "[sweep] run 12/12, ETA " in out  # one counter across stages
    assert "[sweep] 12 runs: 12 done, 0 skipped (finished before), 0 failed" in out
    assert f"report: {tmp_path / 'report.md'}" in out and "[report] tiny_cnn/tiny_cnn" in out
    assert "student_checkpoint" not in out  # no advice about a scheme the sweep computes later
    assert "Check T prob" not in out and "nan" not in out
    assert max(len(line) for line in out.splitlines() if line.startswith("[tstddev]")) < 200
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
    assert "[sweep] 12 runs: 0 done, 12 skipped (finished before), 0 failed" in capsys.readouterr().out


def test_parallel_executor_runs_launch_subprocesses(tmp_path, monkeypatch):
    """parallel=N: runs go to `python -m kdjax` subprocesses, N at a time; a failing run is reported, the others finish."""
    from helpers import launch_env
    for key, value in launch_env().items():
        monkeypatch.setenv(key, value)
    common = dict(teacher="none", student="tiny_cnn", dataset="digits", epochs=1, image_size=8, batch_size=32,
                  last_batch="drop")
    runs = [sweep.Run("distill", str(tmp_path / aug), grid.run_fields(common, aug=aug), stage=0)
            for aug in ("mixup", "cutmix")]
    runs.append(sweep.Run("distill", str(tmp_path / "bad"), grid.run_fields(common, aug="cutmix_pick_t"), stage=0))
    failed = sweep.execute(runs, tasks.run, parallel=2, log=lambda line: None).failed
    assert [r.workdir for r in failed] == [str(tmp_path / "bad")]
    assert "needs a teacher" in (tmp_path / "bad" / "launch.log").read_text()
    for aug in ("mixup", "cutmix"):
        assert json.loads((tmp_path / aug / "results.json").read_text())["aug"] == aug


def test_dry_run_and_status_of_a_local_sweep_start_nothing(tmp_path, capsys):
    from kdjax.tasks import sweep as sweep_task
    config = load_config("demo", "pairs=tiny_cnn:tiny_cnn,augs=cutmix,image_size=8,dry_run=true")
    assert sweep_task.run(config, str(tmp_path / "w")) == {"runs": 3, "to_run": 3}
    out = capsys.readouterr().out
    assert "[sweep] dry run, nothing runs: 3 runs, 0 finished, 3 to run in this process:" in out
    assert "stage 2: distill aug=cutmix" in out and f"(after {tmp_path / 'w' / 'teachers' / 'tiny_cnn'})" in out
    config.dry_run, config.action = False, "status"
    assert sweep_task.run(config, str(tmp_path / "w")) == {"runs": 3, "done": 0}
    assert "[sweep] 3 runs: 0 finished, 0 locked" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()

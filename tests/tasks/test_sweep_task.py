"""The sweep task: the demo pipeline end to end on digits with a tiny model, and the subprocess executor."""
import json

import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import load_config
from kdjax import sweep, tasks
from kdjax.sweep import grid


@pytest.mark.slow  # ~2 min: the demo's pipeline; the default suite sweeps two distillers and the wheel's sweep
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
    # (the closing line's results path, as long as pytest's temporary directory, is not counted)
    assert max(len(line.split("; results in ")[0]) for line in out.splitlines() if line.startswith("[tstddev]")) < 200
    for aug in ("identity", "cutmix_pick_s", "cutmix_pick_t"):
        assert (tmp_path / "tiny_cnn-tiny_cnn" / aug / "seed0" / "results.json").exists()
    # seven students run one KD program (augment.switch): the first compiles it, the other six only read the
    # compile cache; each CutMixPick compiles its own step
    students = {aug: json.loads((tmp_path / "tiny_cnn-tiny_cnn" / aug / "seed0" / "results.json").read_text())
                for aug in ("identity", "flip", "autoaugment", "cutmix", "cutmix_pick_s", "cutmix_pick_t")}
    assert all(r["config"]["scheme_switch"] is True for r in students.values())
    assert [students[a]["compile_cache"]["misses"] for a in ("flip", "autoaugment", "cutmix")] == [0, 0, 0]
    assert all(students[a]["compile_cache"]["misses"] >= 1 for a in ("identity", "cutmix_pick_s", "cutmix_pick_t"))
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


@pytest.mark.slow  # ~35 s: parallel=N local subprocesses; the shard test runs processes side by side by default
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
    # a dataset that is not here: the dry run names it (the real run would stop on it before starting)
    config = load_config("demo", f"pairs=tiny_cnn:tiny_cnn,augs=cutmix,image_size=8,dry_run=true,datasets=cifar100,"
                                 f"data_dir={tmp_path / 'tfds'},manual_dir={tmp_path / 'manual'}")
    sweep_task.run(config, str(tmp_path / "w"))
    assert "[sweep] missing, the sweep would not start: dataset cifar100: " in capsys.readouterr().out
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("augs", [("identity", "cutmix"),
                                  pytest.param(("identity", "flip", "cutmix"), marks=pytest.mark.slow)],
                         ids=["2_schemes", "3_schemes_correlations"])
def test_sweep_of_two_distillers_reports_each_on_its_own(tmp_path, capsys, augs):
    """distillers=kd,pkt+kd: one student per distiller and scheme (kd's in the usual layout, pkt+kd's under
    pkt_kd/), the teacher and the T. stddev runs shared, and a report grouped by distiller whose numbers are the
    runs' own results.json values (with three schemes, behind slow, also each distiller's coefficients)."""
    import csv
    from kdjax.sweep import analysis
    from kdjax.tasks import sweep as sweep_task
    config = load_config("demo", f"pairs=tiny_cnn:tiny_cnn,augs={'+'.join(augs)},distillers=kd+pkt_kd,epochs=1,"
                                 "teacher_epochs=1,tstddev_epochs=1,image_size=8")
    assert config.distillers == ("kd", "pkt_kd")  # '+' joins items after the colon: crd_kd spells crd+kd there
    sweep_task.run(config, str(tmp_path))
    out = capsys.readouterr().out
    runs = 1 + len(augs) + 2 * len(augs)  # the teacher, T. stddev per teacher-only scheme, students per distiller
    assert f"[sweep] {runs} runs: {runs} done, 0 skipped (finished before), 0 failed" in out
    assert "distiller=pkt+kd" in out and "distiller=kd " in out
    results = {}
    for label, top in (("kd", tmp_path), ("pkt+kd", tmp_path / "pkt_kd")):
        for aug in augs:
            record = json.loads((top / "tiny_cnn-tiny_cnn" / aug / "seed0" / "results.json").read_text())
            assert record["distiller"] == label.split("+")[0] and analysis.distiller_of(record) == label
            assert bool(record["config"]["distill"]["with_kd"]) == (label == "pkt+kd")
            results[label, aug] = record
    assert results["pkt+kd", "identity"]["loss_weights"]["alpha"] == 1.0  # the '+KD' variant keeps its KL block
    tstd = {aug: json.loads((tmp_path / "tstddev/tiny_cnn/seed0" / aug / "results.json").read_text())["tstddev"]
            for aug in augs}
    rows = {(r["distiller"], r["aug"]): r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert list(rows) == [(d, a) for d in ("kd", "pkt+kd") for a in augs]  # grouped by distiller, kd first
    for (label, aug), record in results.items():
        assert float(rows[label, aug]["test_loss_mean"]) == record["test_loss"]
        assert float(rows[label, aug]["top1_mean"]) == record["top1"]
        assert float(rows[label, aug]["tstddev_mean"]) == tstd[aug]
    report = (tmp_path / "report.md").read_text()
    assert "Distillers: kd, pkt+kd." in report and "## tiny_cnn/tiny_cnn, Digits (PKT+KD)" in report
    kd_section = report.index("## tiny_cnn/tiny_cnn, Digits\n")
    pkt_section = report.index("## tiny_cnn/tiny_cnn, Digits (PKT+KD)")
    assert kd_section < pkt_section
    for (label, aug), record in results.items():  # each loss in its own distiller's table
        section = report[kd_section:pkt_section] if label == "kd" else report[pkt_section:]
        assert f"| {analysis.scheme_label(aug)} | {tstd[aug]:.6f} | 1 | {record['test_loss']:.4f} |" in section
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "tiny_cnn-tiny_cnn_digits.png", "tiny_cnn-tiny_cnn_digits_pkt_kd.png"]
    corr = {r["distiller"]: r for r in csv.DictReader(open(tmp_path / "correlations.csv"))}
    assert sorted(corr) == ([] if len(augs) < 3 else ["kd", "pkt+kd"])
    for label in corr:
        want = analysis.correlations([tstd[a] for a in augs], [results[label, a]["test_loss"] for a in augs])
        assert float(corr[label]["pearson"]) == want["pearson"] and float(corr[label]["kendall"]) == want["kendall"]
        assert f"[report] tiny_cnn/tiny_cnn, Digits{'' if label == 'kd' else ' (PKT+KD)'}: Pearson" in out

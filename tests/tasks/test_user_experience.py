"""What a researcher sees, from real subprocess runs: an annealed schedule stated up front, best-epoch figures,
a finished run answered from its results, Ctrl-C in one line, a sweep that checks before it starts, a report
that prints its correlations, checkpoints that supply the dataset."""
import json
import signal
import subprocess
import sys

import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import launch_env, load_config
from test_sweep_analysis import fabricate_sweep

TINY = ("--config.model=tiny_cnn", "--config.dataset=digits", "--config.image_size=8", "--config.batch_size=32",
        "--config.last_batch=drop")


def kdjax(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "kdjax", *args], cwd=cwd, env=launch_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    proc = kdjax("teacher", *TINY, "--config.epochs=3", "--config.optim.lr=0.1", f"--workdir={root / 't'}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, proc


def test_a_shortened_run_anneals_and_says_so_first(teacher_run):
    root, proc = teacher_run
    first = proc.stdout.splitlines()[0]
    assert "3 epochs of" in first and "lr 0.1, x0.1 after epochs 2, 2, 3" in first
    rows = [json.loads(line) for line in (root / "t" / "metrics.jsonl").read_text().splitlines()]
    lrs = {row["epoch"]: row["lr"] for row in rows if "lr" in row}
    assert [lrs[e] for e in (1, 2, 3)] == pytest.approx([0.1, 0.1, 0.001], rel=1e-6)
    results = json.loads((root / "t" / "results.json").read_text())
    assert results["decay_epochs"] == [2, 2, 3]
    evaluated = {row["epoch"]: row for row in rows if "top1" in row}
    best = max(evaluated.values(), key=lambda row: row["top1"])
    assert results["best_top1"] == best["top1"] and results["best_epoch"] == best["epoch"]
    assert results["best_test_loss"] == best["test_loss"]
    assert "ETA ?" in proc.stdout  # no ETA from a first dispatch alone
    assert "WARNING" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_finished_run_started_again_answers_from_its_results(teacher_run):
    root, _ = teacher_run
    before = (root / "t" / "metrics.jsonl").read_text()
    proc = kdjax("teacher", *TINY, "--config.epochs=3", "--config.optim.lr=0.1", f"--workdir={root / 't'}", cwd=root)
    assert proc.returncode == 0 and "already finished: test_loss" in proc.stdout, proc.stderr
    assert "resuming" not in proc.stdout and "compil" not in proc.stdout
    assert (root / "t" / "metrics.jsonl").read_text() == before


def test_evaluate_takes_dataset_and_size_from_the_checkpoint(teacher_run):
    root, _ = teacher_run
    proc = kdjax("evaluate", f"--config.checkpoint={root / 't'}", f"--workdir={root / 'e'}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((root / "e" / "results.json").read_text())
    assert results["dataset"] == "digits" and results["config"]["image_size"] == 8
    assert results["config"]["dataset"] == "digits"  # the resolved value is what the run records


def test_ctrl_c_ends_in_one_line_saying_what_was_saved(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kdjax", "teacher", *TINY, "--config.epochs=200",
                             "--config.checkpoint_every=1", f"--workdir={tmp_path / 't'}"], cwd=tmp_path,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("[teacher] epoch 2 test_loss"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted at step ") and "run the same command to " \
        "resume" in lines[0] and "the last checkpoint is step" in lines[0], err


def test_the_paper_sweep_without_cifar_stops_before_starting(tmp_path):
    proc = kdjax("sweep", f"--config.data_dir={tmp_path / 'none'}", f"--config.manual_dir={tmp_path / 'none'}",
                 "--config.teacher_checkpoints.vgg13=/nowhere", f"--workdir={tmp_path / 'w'}", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: the sweep cannot start (") and "runs planned, none started" in lines[0]
    assert any("dataset cifar100" in line and "cifar-100-python.tar.gz" in line for line in lines)
    assert any("teacher_checkpoints.vgg13" in line for line in lines)
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_the_report_prints_where_it_wrote_and_each_correlation(tmp_path):
    fabricate_sweep(tmp_path / "results")
    proc = kdjax("report", f"--config.results_dir={tmp_path / 'results'}", f"--workdir={tmp_path / 'out'}",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "out" / "report.md") in proc.stdout
    assert any(line.startswith("[report] ") and "Pearson" in line and "Kendall" in line
               for line in proc.stdout.splitlines())


def test_config_checks_run_in_the_distill_task_too(tmp_path):
    from kdjax.tasks import distill
    config = load_config("distill", "teacher=none,student=tiny_cnn,dataset=digits,epochs=0")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        distill.run(config, str(tmp_path / "w"))


def test_an_abandoned_async_save_prints_nothing_after_the_interrupt_line():
    """An interrupt during an asynchronous checkpoint save leaves unstarted coroutines; after the interrupt line
    they must not add a RuntimeWarning each at exit (the race the Ctrl-C test above can hit)."""
    program = ("import gc, sys\n"
               "from kdjax.tasks import ignore_abandoned_saves\n"
               "if sys.argv[1] == 'ignore': ignore_abandoned_saves()\n"
               "async def save(): pass\n"
               "pending = save(); del pending; gc.collect()\n")
    for mode, expect_warning in (("keep", True), ("ignore", False)):
        done = subprocess.run([sys.executable, "-c", program, mode], env=launch_env(), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert ("was never awaited" in done.stderr) == expect_warning, done.stderr

"""SIGTERM and SIGUSR1 stop a standalone run between steps, as in a sweep: checkpoints closed, the workdir lock
released, one line saying how to resume, exit status 130 (Python's default would kill the process on the spot)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import launch_env


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_stops_a_standalone_run_between_steps(tmp_path, signum):
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "kdjax", "teacher", "--config.model=tiny_cnn", "--config.dataset=synthetic",
           "--config.image_size=8", "--config.batch_size=32", "--config.dataset_options.num_train=64",
           "--config.dataset_options.num_test=32", "--config.epochs=100000", f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # training has started
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no training step within 300 s"
            time.sleep(0.2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "run the same command to resume" in lines[0], err
    assert not (workdir / ".kdjax.lock").exists()  # released on the way out
    assert all(json.loads(row) for row in metrics.read_text().splitlines())  # no torn row

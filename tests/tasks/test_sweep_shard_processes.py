"""shard=i/n for schedulers other than SLURM: two `kdjax sweep --config.shard=i/2` processes started at once on one
workdir finish a tiny grid together, each run executed by exactly one of them, and one report is written."""
import json
import subprocess
import sys
import time
from collections import Counter

from helpers import launch_env

GRID = ["--config.pairs=tiny_cnn:tiny_cnn", "--config.augs=cutmix", "--config.seeds=0",
        "--config.datasets=synthetic", "--config.epochs=1", "--config.teacher_epochs=1", "--config.tstddev_epochs=2",
        "--config.image_size=8", "--config.batch_size=32", "--config.dataset_options.num_train=128",
        "--config.dataset_options.num_test=64", "--config.dataset_options.num_classes=10", "--config.poll_s=0.3"]


def test_two_shards_finish_the_grid_with_each_run_executed_once(tmp_path):
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "kdjax", "demo", *GRID, f"--config.shard={i}/2",
                               f"--workdir={tmp_path / 'grid'}"], env=launch_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    wall = time.monotonic() - t0
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    taken = [line.split(" runs: ", 1)[1] for out in outs for line in out.splitlines()
             if line.startswith("[sweep] shard ") and " runs: " in line]
    runs = sorted(tmp_path.rglob("results.json"))
    assert len(runs) == 3 and len(taken) == 3  # teacher, T. stddev, student
    assert max(Counter(taken).values()) == 1
    assert not any("] already finished:" in out for out in outs)  # no run was answered a second time
    for path in runs:  # a training run trained once: each step logged once
        metrics = path.parent / "metrics.jsonl"
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
                     if "loss" in json.loads(line)]
            assert len(steps) == len(set(steps)), path
    assert (tmp_path / "grid" / "report.md").exists()
    per_shard = [sum(line.startswith(f"[sweep] shard {i}/2 runs: ") for line in out.splitlines())
                 for i, out in enumerate(outs)]
    print(f"\n[timing] two shards, 3 runs (taken {per_shard[0]} + {per_shard[1]}): {wall:.1f} s")

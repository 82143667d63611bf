"""A single run over several SLURM tasks: ``srun --ntasks=2 python -m kdjax ...`` initialises jax.distributed
from SLURM's own variables (gloo collectives on CPU) and trains with the same per-step losses as one process
holding two devices. Runs on the real single-node cluster of tests/slurm_cluster.py."""
import json
import pathlib
import re
import sys

import numpy as np
import pytest

from helpers import REPO, TESTS, launch
from slurm_cluster import slurm_cluster, slurm_cluster_session  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slurm

RUN = ("distill.py:teacher=none,student=tiny_cnn,dataset=synthetic,epochs=1,aug=cutmix,batch_size=32,image_size=8,"
       "steps_per_dispatch=1", "--config.dataset_options.num_train=320", "--config.dataset_options.num_test=64",
       "--config.dataset_options.num_classes=10")


def _losses(workdir):
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_srun_two_tasks_train_like_one_process(slurm_cluster, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip("needs 2 CPUs")
    workdir = tmp_path / "two"
    args = " ".join(f"'{a}'" for a in (f"--config={REPO / 'configs' / RUN[0].split(':')[0]}:"
                                       f"{RUN[0].split(':', 1)[1]}", *RUN[1:], f"--workdir={workdir}"))
    script = (f"#!/bin/bash\n#SBATCH --ntasks=2\nexport JAX_PLATFORMS=cpu KDJAX_PLUGINS=tiny_models "
              f"PYTHONPATH={TESTS}:{REPO} JAX_DISABLE_MOST_OPTIMIZATIONS=1 TF_CPP_MIN_LOG_LEVEL=3\n"
              f"srun --label --ntasks=2 {sys.executable} -m kdjax {args}\n")
    slurm_cluster.wait_idle()
    job = slurm_cluster.sbatch(script=script)
    record = slurm_cluster.wait_for(job, timeout=300)
    out = (slurm_cluster.dir / "jobs" / f"{job}.out").read_text()
    assert record["JobState"] == "COMPLETED", out[-8000:]  # both tasks' lines, labelled
    assert re.search(r"on 2 x .* \(cpu\)", out)  # one device per task, one mesh over both
    launch(RUN[0], tmp_path / "one", *RUN[1:], devices=2)
    np.testing.assert_allclose(_losses(workdir), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-5)

"""Smoke tests against a real single-node SLURM cluster (tests/slurm_cluster.py starts it).

What a submitit-based kdjax executor can rely on, checked on SLURM 22.05 without accounting:
submitit results, afterok dependencies with --kill-on-invalid-dep, job arrays, requeue and the
signals a job sees, srun with 2 tasks, and jax.distributed auto-detection under srun.
Skipped when SLURM cannot be installed/started (a failure with CI=true).
"""
import operator
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import (  # noqa: F401  (fixtures)
    SlurmCluster,
    TERMINAL_STATES,
    slurm_cluster,
    slurm_cluster_accounting,
    slurm_cluster_accounting_session,
    slurm_cluster_session,
)

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slurm


def _executor(folder: Path, **params):
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1, **params)
    return ex


def _wait_done(job, cluster, timeout=60.0):
    """Finished = submitit's result pickle exists, or SLURM reports a terminal state (what an
    executor without sacct has to do: submitit alone waits forever for a job that never ran)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.paths.result_pickle.exists():
            return "RESULT"
        state = cluster.job_state(job.job_id)
        if state in TERMINAL_STATES:
            # the pickle is written before the job ends: look again, it may have appeared meanwhile
            return "RESULT" if job.paths.result_pickle.exists() else state
        time.sleep(0.2)
    raise TimeoutError(f"job {job.job_id} still {cluster.job_state(job.job_id)} after {timeout} s")


def test_cluster_is_up_and_sacct_is_not(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-o", "%P|%a|%D|%c").stdout.split()
    assert out == [f"debug*|up|1|{slurm_cluster.cpus}"]
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf)
    sacct = slurm_cluster.run("sacct", "-j", "1", check=False)
    assert sacct.returncode == 1
    assert "Slurm accounting storage is disabled" in sacct.stdout + sacct.stderr


def test_submitit_result(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(os.getenv, "SLURM_JOB_ID")
    assert _wait_done(job, slurm_cluster) == "RESULT"
    assert job.result() == job.job_id  # it ran as that SLURM job
    # Without sacct submitit never learns a state: every sacct call fails and is "bypassed".
    assert job.state == "UNKNOWN"


def test_dependency_on_failed_parent_is_cancelled(slurm_cluster, tmp_path):
    parent = _executor(tmp_path).submit(operator.truediv, 1, 0)
    child = _executor(
        tmp_path,
        slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}", "kill-on-invalid-dep": "yes"},
    ).submit(os.getenv, "SLURM_JOB_ID")
    # Plain sbatch dependant without --kill-on-invalid-dep: it stays PENDING forever.
    orphan = slurm_cluster.sbatch(f"--dependency=afterok:{parent.job_id}", wrap="true")

    assert _wait_done(parent, slurm_cluster) == "RESULT"
    with pytest.raises(submitit.core.utils.FailedJobError, match="ZeroDivisionError"):
        parent.result()
    assert slurm_cluster.wait_for(parent.job_id)["JobState"] == "FAILED"

    rec = slurm_cluster.wait_for(child.job_id, timeout=30)
    assert rec["JobState"] == "CANCELLED"
    assert rec.get("Reason", "DependencyNeverSatisfied") == "DependencyNeverSatisfied"  # jobcomp has no Reason
    assert not child.paths.result_pickle.exists() and not child.paths.stdout.exists()  # it never ran
    assert not child.done(force_check=True)  # submitit alone cannot tell (no sacct): job.result() would hang

    rec = slurm_cluster.wait_for(orphan, {"PENDING"})
    deadline = time.monotonic() + 15
    while rec.get("Reason") != "DependencyNeverSatisfied" and time.monotonic() < deadline:
        time.sleep(0.2)
        rec = slurm_cluster.job_records(orphan)[0]
    assert (rec["JobState"], rec["Reason"]) == ("PENDING", "DependencyNeverSatisfied")
    assert rec["Dependency"] == f"afterok:{parent.job_id}(failed)"
    slurm_cluster.run("scancel", orphan)
    assert slurm_cluster.wait_for(orphan)["JobState"] == "CANCELLED"


def test_submitit_array_throttled(slurm_cluster, tmp_path):
    ex = _executor(tmp_path, slurm_array_parallelism=2)
    jobs = ex.map_array(operator.add, [1, 2, 3, 4], [10, 20, 30, 40])
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(4)]
    throttles = {r.get("ArrayTaskThrottle") for r in slurm_cluster.job_records(array_id)}
    assert throttles <= {"2", None}
    for job in jobs:
        assert _wait_done(job, slurm_cluster) == "RESULT"
    assert [j.result() for j in jobs] == [11, 22, 33, 44]


def test_srun_two_tasks(slurm_cluster):
    if slurm_cluster.cpus < 2:
        pytest.skip("needs 2 CPUs")
    slurm_cluster.wait_idle()
    script = textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --ntasks=2
        echo "batch ntasks=$SLURM_NTASKS procid=$SLURM_PROCID step_nodelist=${SLURM_STEP_NODELIST-unset}"
        srun --ntasks=2 bash -c 'echo "task procid=$SLURM_PROCID localid=$SLURM_LOCALID ntasks=$SLURM_NTASKS step_nodelist=$SLURM_STEP_NODELIST"'
        """)
    job = slurm_cluster.sbatch(script=script)
    assert slurm_cluster.wait_for(job)["JobState"] == "COMPLETED"
    lines = (slurm_cluster.dir / "jobs" / f"{job}.out").read_text().splitlines()
    node = slurm_cluster.node
    # The batch step itself has SLURM_NTASKS/PROCID but no SLURM_STEP_NODELIST, so jax's SLURM
    # auto-detection only triggers inside srun steps.
    assert lines[0] == "batch ntasks=2 procid=0 step_nodelist=unset"
    assert sorted(lines[1:]) == [f"task procid={i} localid={i} ntasks=2 step_nodelist={node}" for i in (0, 1)]


JAX_SCRIPT = """\
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize()  # coordinator, process count and id from SLURM_* (srun step)
import jax.numpy as jnp
from jax.experimental import multihost_utils
x = multihost_utils.process_allgather(jnp.array([10 * jax.process_index() + 1]))
print(f"process {jax.process_index()}/{jax.process_count()} devices={len(jax.devices())} gathered={x.ravel().tolist()}",
      flush=True)
jax.distributed.shutdown()
"""


def test_jax_distributed_two_tasks(slurm_cluster, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip("needs 2 CPUs")
    (tmp_path / "dist.py").write_text(JAX_SCRIPT)
    slurm_cluster.wait_idle()
    script = f"#!/bin/bash\n#SBATCH --ntasks=2\nJAX_PLATFORMS=cpu srun --ntasks=2 {sys.executable} {tmp_path / 'dist.py'}\n"
    job = slurm_cluster.sbatch(script=script)
    rec = slurm_cluster.wait_for(job, timeout=90)
    out = (slurm_cluster.dir / "jobs" / f"{job}.out").read_text()
    assert rec["JobState"] == "COMPLETED", out
    got = sorted(line for line in out.splitlines() if line.startswith("process "))
    assert got == [f"process {i}/2 devices=2 gathered=[1, 11]" for i in (0, 1)], out


SIGNAL_SCRIPT = """\
import os, signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
def handler(sig, frame):
    log.write(f"{signal.Signals(sig).name}\\n")
    if sig == signal.SIGTERM:
        sys.exit(0)
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCONT):
    signal.signal(s, handler)
log.write(f"start restart_count={os.environ.get('SLURM_RESTART_COUNT', 'unset')}\\n")
while True:
    time.sleep(0.1)
"""


def test_requeue_and_signals(slurm_cluster, tmp_path):
    py = tmp_path / "sig.py"
    py.write_text(SIGNAL_SCRIPT)
    log = tmp_path / "signals.log"
    script = f"#!/bin/bash\n#SBATCH --requeue\nsrun --unbuffered {sys.executable} {py} {log}\n"
    job = slurm_cluster.sbatch(script=script)

    def wait_log(text, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not in {log.read_text() if log.exists() else '(no log)'}")

    wait_log("start restart_count=unset")
    slurm_cluster.run("scancel", "--signal=USR1", job)  # what submitit's job._interrupt() sends: reaches srun tasks
    wait_log("SIGUSR1")
    slurm_cluster.run("scontrol", "requeue", job)  # preemption with PreemptMode=REQUEUE takes the same path
    wait_log("SIGTERM")
    rec = slurm_cluster.wait_for(job, {"PENDING"})
    assert rec["Restarts"] == "1"
    # Held (Reason=BeginTime) until the revoked credential expires on slurmd: cred_expire, 120 s by
    # default, 5 s here. Forcing `scontrol update StartTime=now` before that makes the job FAILED
    # ("Job credential revoked"), so just wait.
    wait_log("start restart_count=1", timeout=60)
    assert log.read_text().splitlines()[:4] == ["start restart_count=unset", "SIGUSR1", "SIGCONT", "SIGTERM"]
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_for(job)["JobState"] == "CANCELLED"


def test_teardown_leaves_no_process(slurm_cluster):
    other = SlurmCluster().start()
    directory = other.dir
    try:
        job = other.sbatch(wrap="sleep 300")
        other.wait_for(job, {"RUNNING"})
        assert other.leftover_pids()
    finally:
        other.stop()
    assert other.leftover_pids() == []
    assert not directory.exists()
    assert other.timings["start_s"] < 30 and other.timings["stop_s"] < 30, other.timings


@pytest.mark.slow
def test_submitit_states_with_accounting(slurm_cluster_accounting, tmp_path):
    cluster = slurm_cluster_accounting
    parent = _executor(tmp_path).submit(operator.truediv, 1, 0)
    child = _executor(
        tmp_path,
        slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}", "kill-on-invalid-dep": "yes"},
    ).submit(os.getenv, "SLURM_JOB_ID")
    ok = _executor(tmp_path).submit(os.getenv, "SLURM_JOB_ID")
    assert ok.result() == ok.job_id
    with pytest.raises(submitit.core.utils.FailedJobError):
        parent.result()
    deadline = time.monotonic() + 30
    while not child.done(force_check=True):  # sacct works: submitit sees the cancelled child
        assert time.monotonic() < deadline, cluster.run("sacct", "-a", "--parsable2").stdout
        time.sleep(0.5)
    assert child.state == "CANCELLED"
    while ok.watcher.get_state(ok.job_id, mode="force") != "COMPLETED" or parent.state != "FAILED":
        assert time.monotonic() < deadline, cluster.run("sacct", "-a", "--parsable2").stdout
        time.sleep(0.5)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        child._results_timeout_s = 0
        child.result()

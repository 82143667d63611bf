"""What a SLURM job runs (``RunJob``), and the workdir lock a job's previous incarnation or an ended job left."""
import contextlib
import json
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable, List, Sequence


from kdjax import workdir as workdir_lib
from kdjax.interrupts import stop_on_sigterm
from kdjax.sweep.executor import build_config
from kdjax.sweep.grid import Run
from kdjax.sweep.slurm.record import LOG, last_error

STARTS = "slurm_job.jsonl"           # in a run's workdir: one line per start of a job on it


# --------------------------------------------------------------------------------------------------------------
# The job


def _own_job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "?")


def _read_starts(workdir: str) -> List[dict]:
    try:
        with open(os.path.join(workdir, STARTS)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def take_over_previous_incarnation(workdir: str, job_id: str, restart: int, log=print) -> bool:
    """Remove the workdir lock held by this job's previous run (before a requeue): SLURM starts a requeued job only
    once every process of its previous run has gone, so that lock is stale even when it was taken on another node,
    where the lock's own rule (a dead PID on the same host) cannot see it."""
    starts = _read_starts(workdir)
    if restart < 1 or not starts:
        return False
    previous = starts[-1]
    if previous.get("job_id") != job_id or int(previous.get("restart", 0)) >= restart:
        return False
    holder = workdir_lib.remove_lock_held_by(workdir, previous.get("host"), previous.get("pid"))
    if holder is None:
        return False
    log(f"[slurm] job {job_id} restart {restart}: took over the lock of its previous run (PID {holder.get('pid')} "
        f"on {holder.get('host')})")
    return True


def clear_lock_of_ended_job(workdir: str, job_ids: Sequence[str], active: Sequence[str], log=print) -> bool:
    """Before a run is resubmitted: remove its workdir lock when the holder is the last job that started on it, one
    of ``job_ids`` (the run's recorded jobs) and no longer active in SLURM. SLURM ends every process of a job when
    the job ends, so that lock is stale even if it was taken on another node, where the lock's own rules would wait
    10 minutes for its heartbeat (a SIGKILLed or out-of-memory job leaves its lock behind)."""
    starts = _read_starts(workdir)
    if not starts or starts[-1].get("job_id") not in set(job_ids) or starts[-1].get("job_id") in set(active):
        return False
    if workdir_lib.remove_lock_held_by(workdir, starts[-1].get("host"), starts[-1].get("pid")) is None:
        return False
    log(f"[sweep] removed the lock that ended job {starts[-1]['job_id']} left in {workdir}")
    return True


@contextlib.contextmanager
def _output_to(path: str):
    """Send this process's stdout and stderr (file descriptors, so that every library's output goes too) to
    ``path``, appending, for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Python-level writes too, even where sys.stdout was replaced by something not writing to fd 1
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


class RunJob:
    """What a SLURM job runs: one run of the sweep, in the job's process, through ``run_command(config, workdir)
    -> exit status`` (``kdjax.tasks.run_command``, handed down by the sweep task: bad input one line, SIGTERM a
    clean stop).

    Re-runnable by construction: a requeued job calls it again from the start and the run resumes from its
    checkpoints (a finished run answers from its results). SIGTERM, which SLURM sends first when it cancels,
    requeues or preempts a job, stops the run between steps (``stop_on_sigterm``). ``checkpoint`` is submitit's
    hook for the signal it gets before the time limit: returning the same call makes submitit requeue the job
    instead of letting it die.
    """

    def __init__(self, run: Run, run_command: Callable[[Any, str], int]):
        self.run = run
        self.workdir = run.workdir
        self.run_command = run_command

    def __call__(self) -> str:
        job_id = _own_job_id()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        os.makedirs(self.workdir, exist_ok=True)
        log_path = os.path.join(self.workdir, LOG)
        with _output_to(log_path):
            print(f"[slurm] job {job_id} (restart {restart}) on {socket.gethostname()} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: kdjax {self.run.task} ...", flush=True)
            take_over_previous_incarnation(self.workdir, job_id, restart)
            with open(os.path.join(self.workdir, STARTS), "a") as f:
                f.write(json.dumps({"job_id": job_id, "restart": restart, "host": socket.gethostname(),
                                    "pid": os.getpid(), "time": time.time()}) + "\n")
            self._requeueing = False
            with stop_on_sigterm(ignore=lambda: self._requeueing):
                status = self._main()
            print(f"[slurm] job {job_id}: kdjax {self.run.task} ended with status {status}", flush=True)
        if status:
            raise RuntimeError(f"kdjax {self.run.task} failed (exit status {status}) in {self.workdir}: "
                               f"{last_error(self.workdir)} (see {log_path})")
        return self.workdir

    def _main(self) -> int:
        from kdjax import plugins
        try:
            plugins.import_plugins()  # the models and schemes the sweep's own process had registered
            return self.run_command(build_config(self.run), self.workdir)
        except SystemExit:  # submitit's own exit after requeueing the job: let it leave its way
            raise
        except Exception:  # noqa: BLE001  an unexpected error: its traceback belongs in the run's log too
            traceback.print_exc()
            return 1

    def checkpoint(self):
        import submitit
        # submitit requeues the job next and leaves through SystemExit; the SIGTERM of that requeue must not
        # interrupt the run's closing (its last checkpoint being finalised)
        self._requeueing = True
        return submitit.helpers.DelayedSubmission(self)

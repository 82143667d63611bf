"""``executor=slurm``: the sweep's runs as SLURM jobs, submitted through submitit (``pip install kdjax[slurm]``).

One job per run, a job array for the runs of one stage and task that wait on the same jobs; each job depends
(``afterok``) on exactly the jobs of the runs it consumes (a student on its teacher, the CutMixPick (S. ent.)
T. stddev on its student) and is submitted with ``--kill-on-invalid-dep=yes``, so that a failed teacher cancels
its dependants instead of leaving them pending for ever. A job runs its run's ``kdjax <task> ...`` command in the
job's process (``RunJob``), with the run's output in ``<run workdir>/launch.log``.

State comes from the sweep's own record of what it submitted (``<sweep workdir>/slurm_jobs.json``) and from
``squeue`` (``sacct`` only names the end state of a job squeue has forgotten, where accounting exists): submitit
learns job states from sacct alone, which a cluster without accounting lacks, and waits for ever for a job that
never wrote a result (one cancelled by its dependency, killed, or timed out). A run is finished when its done
marker exists (results.json, written last by the run itself), whatever SLURM says.

Rerunning the sweep command reconciles: finished runs are skipped, queued and running ones left alone, failed ones
resubmitted up to ``max_retries`` times and then reported, with the runs that wait on them. A dependency is only
ever placed on a job that squeue shows queued or running, or on one submitted in the same pass: SLURM accepts
``afterok`` on a job id it has already forgotten and starts the dependant at once.

Preemption and time limits: every job is re-runnable. A requeued job (``scontrol requeue``, preemption) runs its
command again and the run resumes from its latest checkpoint; the workdir lock of the killed holder is taken over
(a dead PID on the same host, or the previous incarnation of this very job on another node). Before the time
limit submitit's USR2 handler requeues the job (``RunJob.checkpoint``), up to ``slurm.max_timeouts`` times.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

from kdjax.sweep.executor import command_line, inputs_of, set_aside, stale, stop_on_sigterm
from kdjax.sweep.grid import Run

RECORD = "slurm_jobs.json"
CANCELLED = "slurm_cancelled.json"   # ids stopped by action=cancel (their runs are resubmitted only on request)
STARTS = "slurm_job.jsonl"           # in a run's workdir: one line per start of a job on it
LOG = "launch.log"

# squeue's %T in SLURM 22.05: a job in one of these may still run (or run again); any other state is final.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                           "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
# sbatch options the sweep sets itself, per job
RESERVED_OPTIONS = ("dependency", "kill-on-invalid-dep", "array", "output", "error", "open-mode", "signal")


class SlurmError(ValueError):
    """SLURM cannot be reached or refused something; one line that says what."""


# --------------------------------------------------------------------------------------------------------------
# SLURM's commands


def _slurm(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"`{argv[0]}` is not on PATH: executor=slurm runs where SLURM's commands (sbatch, squeue, "
                         f"scancel) are, e.g. a login node") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{argv[0]}` did not answer within {timeout:.0f} s: is slurmctld up?") from None


def job_states(job_ids: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """{job id: (state, reason)} of the jobs squeue still knows (array tasks as ``<array>_<task>``); a job it has
    forgotten (finished longer than MinJobAge ago) is absent."""
    ids = list(dict.fromkeys(str(j) for j in job_ids))
    out: Dict[str, Tuple[str, str]] = {}
    for start in range(0, len(ids), 200):
        chunk = ids[start:start + 200]
        proc = _slurm("squeue", "-h", "-t", "all", "-r", "-j", ",".join(chunk), "-o", "%i|%T|%r")
        if proc.returncode != 0:
            # one forgotten id alone is an error to squeue ("Invalid job id specified"); with others it is dropped
            if "Invalid job id" in proc.stderr + proc.stdout:
                continue
            raise SlurmError(f"squeue failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[:300]}")
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def sacct_states(job_ids: Sequence[str]) -> Dict[str, str]:
    """{job id: final state} from sacct where it works (clusters with accounting), else {}: only used to say how
    a job squeue has forgotten ended."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    proc = _slurm("sacct", "-n", "-P", "-X", "-j", ",".join(dict.fromkeys(job_ids)), "-o", "JobID,State")
    if proc.returncode != 0:
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 2 and parts[1]:
            out[parts[0]] = parts[1].split()[0]
    return out


def scancel(job_ids: Sequence[str]) -> None:
    if job_ids:
        proc = _slurm("scancel", *job_ids)
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            raise SlurmError(f"scancel failed ({proc.returncode}): {proc.stderr.strip()[:300]}")


# --------------------------------------------------------------------------------------------------------------
# Is the workdir on a filesystem the nodes share?

SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "fuse.beegfs", "cephfs", "ceph", "fuse.ceph",
                      "glusterfs", "fuse.glusterfs", "cifs", "smb3", "smbfs", "panfs", "wekafs", "afs", "ocfs2",
                      "gfs2", "fuse.sshfs", "fuse.juicefs", "fuse.s3fs", "pvfs2", "orangefs", "fhgfs", "quobyte",
                      "fuse.quobyte", "virtiofs", "9p"}
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "vfat", "exfat",
                     "ramfs", "devtmpfs", "squashfs", "jfs", "reiserfs", "ntfs", "ntfs3", "fuse.overlayfs"}


def filesystem_of(path: str) -> Optional[str]:
    """The type of the filesystem ``path`` is (or would be) on: the longest mount point above it in
    /proc/mounts; None where that cannot be read."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ").replace("\\011", "\t")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def partition_nodes(partition: Optional[str]) -> Optional[List[str]]:
    args = ["sinfo", "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else [])
    proc = _slurm(*args)
    if proc.returncode != 0:
        return None
    return sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})


def check_shared_filesystem(root: str, partition: Optional[str], log=print) -> str:
    """Refuse a workdir on a filesystem local to this host when the jobs run on other nodes (they would not see
    it); say so when it cannot tell. Returns the verdict line."""
    kind = filesystem_of(root)
    if kind in SHARED_FILESYSTEMS:
        verdict = f"[sweep] workdir {root} is on {kind}, a filesystem shared between nodes"
    elif kind in LOCAL_FILESYSTEMS:
        nodes = partition_nodes(partition)
        here = socket.gethostname().split(".")[0]
        if nodes is not None and set(n.split(".")[0] for n in nodes) <= {here}:
            verdict = (f"[sweep] workdir {root} is on {kind}, local to this host, which is the only node of the "
                       f"partition: the jobs see it")
        elif nodes is None:
            verdict = (f"[sweep] workdir {root} is on {kind}, local to this host, and sinfo does not list the "
                       f"partition's nodes: cannot tell whether the jobs see it")
        else:
            shown = ", ".join(nodes[:5]) + (", ..." if len(nodes) > 5 else "")
            raise SlurmError(f"workdir {root} is on {kind}, a filesystem local to this host ({here}), but the jobs run "
                             f"on {shown}: put --workdir on a filesystem the nodes share (NFS, Lustre, GPFS, ...), or "
                             f"set --config.slurm.check_shared_fs=false if this path is shared after all")
    else:
        verdict = (f"[sweep] cannot tell whether workdir {root} ({kind or 'unknown filesystem'}) is shared with "
                   f"the nodes: the jobs must see it under the same path")
    log(verdict)
    return verdict


# --------------------------------------------------------------------------------------------------------------
# The record of submitted jobs


def _write_json(path: str, data) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as e:
        raise SlurmError(f"{path} is damaged ({e}); move it away to start the record afresh (the jobs it lists "
                         f"are then not tracked)") from None


class Record:
    """``<sweep workdir>/slurm_jobs.json``: every run of the plan (task, stage, inputs, done marker) and the jobs
    submitted for it, in order. Keys are workdirs relative to the sweep's, so the record survives a moved tree."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, RECORD)
        self.data = _read_json(self.path, {"version": 1, "runs": {}})

    def key(self, workdir: str) -> str:
        return os.path.relpath(workdir, self.root)

    def jobs(self, run: Run) -> List[dict]:
        return self.data["runs"].get(self.key(run.workdir), {}).get("jobs", [])

    def set_plan(self, runs: Sequence[Run], inputs: Dict[str, List[Run]]) -> None:
        old = self.data["runs"]
        new = {}
        for run in runs:
            key = self.key(run.workdir)
            new[key] = {"task": run.task, "stage": run.stage, "describe": run.describe(),
                        "done_marker": run.done_marker, "inputs": [self.key(p.workdir) for p in inputs[run.workdir]],
                        "jobs": old.get(key, {}).get("jobs", [])}
        for key, entry in old.items():  # runs of an earlier, larger plan keep their jobs (status and cancel see them)
            new.setdefault(key, entry)
        self.data["runs"] = new

    def add_job(self, run: Run, job_id: str, stdout: str, dependency: Sequence[str]) -> None:
        entry = self.data["runs"].setdefault(self.key(run.workdir), {"jobs": []})
        entry.setdefault("jobs", []).append({"job_id": str(job_id), "submitted": time.time(), "stdout": stdout,
                                             "dependency": list(dependency)})

    def mark_superseded(self, run: Run) -> None:
        self.jobs(run)[-1]["superseded"] = True

    def runs(self) -> Tuple[List[Run], Dict[str, List[Run]]]:
        """The runs the record knows (``fields`` empty: enough for status and cancel) and their inputs."""
        runs = {key: Run(entry.get("task", "?"), os.path.join(self.root, key), (), int(entry.get("stage", 0)),
                         entry.get("done_marker", "results.json")) for key, entry in self.data["runs"].items()}
        inputs = {run.workdir: [runs[k] for k in self.data["runs"][key].get("inputs", []) if k in runs]
                  for key, run in runs.items()}
        return list(runs.values()), inputs

    def describe(self, run: Run) -> str:
        return self.data["runs"].get(self.key(run.workdir), {}).get("describe") or run.describe()

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        _write_json(self.path, self.data)


def cancelled_ids(root: str) -> set:
    return set(_read_json(os.path.join(root, CANCELLED), []))


# --------------------------------------------------------------------------------------------------------------
# Where each run stands


@dataclasses.dataclass
class RunState:
    run: Run
    status: str                 # done | active | failed | cancelled | new | gave_up | blocked
    job: Optional[dict] = None  # the latest job submitted for the run
    state: str = ""             # its SLURM state ("" once SLURM forgot it)
    reason: str = ""            # SLURM's reason, or what ended it
    attempts: int = 0           # jobs that started on the run and ended without finishing it

    @property
    def to_submit(self) -> bool:
        return self.status in ("new", "failed", "cancelled")


def _started(job: dict) -> bool:
    """A job whose batch script ran has its output file (SLURM creates it on the node): one cancelled by its
    dependency, or while it was pending, never started."""
    return bool(job.get("stdout")) and os.path.exists(job["stdout"])


def assess(runs: Sequence[Run], inputs: Dict[str, List[Run]], record: Record, max_retries: int,
           states: Optional[Dict[str, Tuple[str, str]]] = None) -> Dict[str, RunState]:
    """Every run's state, in plan order (inputs before the runs that consume them). A failed attempt is a job that
    started and ended without the run's done marker; jobs the sweep replaced itself, or that action=cancel
    stopped, are not counted."""
    latest = [jobs[-1]["job_id"] for run in runs if (jobs := record.jobs(run))]
    if states is None:
        states = job_states(latest)
    cancelled = cancelled_ids(record.root)
    out: Dict[str, RunState] = {}
    gone = []
    for run in runs:
        jobs = record.jobs(run)
        job = jobs[-1] if jobs else None
        state, reason = states.get(job["job_id"], ("", "")) if job else ("", "")
        attempts = sum(1 for j in jobs if _started(j) and not j.get("superseded") and j["job_id"] not in cancelled
                       and not (j is job and state in ACTIVE_STATES))
        parents = [out[p.workdir] for p in inputs.get(run.workdir, ()) if p.workdir in out]
        if run.done:
            status = "done"
        elif job and state in ACTIVE_STATES:
            status = "active"
        elif attempts > max_retries:
            status = "gave_up"
        elif any(p.status in ("gave_up", "blocked") for p in parents):
            status = "blocked"
        elif job and job["job_id"] in cancelled:
            status = "cancelled"
        elif attempts:
            status = "failed"
        else:
            status = "new"
        out[run.workdir] = RunState(run, status, job, state, reason, attempts)
        if job and not state and status not in ("done", "active"):
            gone.append(job["job_id"])
    for job_id, final in sacct_states(gone).items():
        for rs in out.values():
            if rs.job and rs.job["job_id"] == job_id:
                rs.state = final
    return out


def last_error(workdir: str) -> str:
    """The run's last ``error:`` line (or its last line) in its launch.log, shortened."""
    return last_line(os.path.join(workdir, LOG))


def last_line(path: str) -> str:
    """The last ``error:`` line of a log (or its last line), shortened."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip() for line in f.readlines()[-200:] if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line.split(":")[0]]
    text = (errors or lines or [""])[-1]
    return text if len(text) <= 200 else text[:197] + "..."


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
    holder = _remove_lock_held_by(workdir, previous)
    if holder is None:
        return False
    log(f"[slurm] job {job_id} restart {restart}: took over the lock of its previous run (PID {holder.get('pid')} "
        f"on {holder.get('host')})")
    return True


def _remove_lock_held_by(workdir: str, start: dict):
    """Remove the workdir lock if the process that ``start`` (a job-start record) names holds it: its holder record,
    or None when the lock is absent, unreadable or held by another process, or by a PID still alive on this host
    (the lock's own rule: a live PID here is never stale, whatever SLURM says)."""
    from kdjax.workdir import LOCK_FILE, pid_alive_here, read_lock
    path = os.path.join(workdir, LOCK_FILE)
    holder = read_lock(path)
    if holder is None or holder.get("host") != start.get("host") or holder.get("pid") != start.get("pid"):
        return None
    if pid_alive_here(holder):
        return None
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return holder


def clear_lock_of_ended_job(workdir: str, job_ids: Sequence[str], active: Sequence[str], log=print) -> bool:
    """Before a run is resubmitted: remove its workdir lock when the holder is the last job that started on it, one
    of ``job_ids`` (the run's recorded jobs) and no longer active in SLURM. SLURM ends every process of a job when
    the job ends, so that lock is stale even if it was taken on another node, where the lock's own rules would wait
    10 minutes for its heartbeat (a SIGKILLed or out-of-memory job leaves its lock behind)."""
    starts = _read_starts(workdir)
    if not starts or starts[-1].get("job_id") not in set(job_ids) or starts[-1].get("job_id") in set(active):
        return False
    if _remove_lock_held_by(workdir, starts[-1]) is None:
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
    """What a SLURM job runs: ``kdjax <task> ...`` of one run (``argv`` after ``kdjax``), in the job's process.

    Re-runnable by construction: a requeued job calls it again from the start and the run resumes from its
    checkpoints (a finished run answers from its results). SIGTERM, which SLURM sends first when it cancels,
    requeues or preempts a job, stops the run between steps (``stop_on_sigterm``). ``checkpoint`` is submitit's
    hook for the signal it gets before the time limit: returning the same call makes submitit requeue the job
    instead of letting it die.
    """

    def __init__(self, argv: Sequence[str], workdir: str):
        self.argv = list(argv)
        self.workdir = workdir

    def __call__(self) -> str:
        job_id = _own_job_id()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        os.makedirs(self.workdir, exist_ok=True)
        log_path = os.path.join(self.workdir, LOG)
        with _output_to(log_path):
            print(f"[slurm] job {job_id} (restart {restart}) on {socket.gethostname()} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: kdjax {' '.join(self.argv[:2])} ...", flush=True)
            take_over_previous_incarnation(self.workdir, job_id, restart)
            with open(os.path.join(self.workdir, STARTS), "a") as f:
                f.write(json.dumps({"job_id": job_id, "restart": restart, "host": socket.gethostname(),
                                    "pid": os.getpid(), "time": time.time()}) + "\n")
            self._requeueing = False
            with stop_on_sigterm(ignore=lambda: self._requeueing):
                status = self._main()
            print(f"[slurm] job {job_id}: kdjax {self.argv[0]} ended with status {status}", flush=True)
        if status:
            raise RuntimeError(f"kdjax {self.argv[0]} failed (exit status {status}) in {self.workdir}: "
                               f"{last_error(self.workdir)} (see {log_path})")
        return self.workdir

    def _main(self) -> int:
        from kdjax import cli
        try:
            cli.main(list(self.argv))
            return 0
        except SystemExit as e:  # the command's own one-line errors end in sys.exit
            if self._requeueing:  # submitit's own exit after requeueing the job: let it leave its way
                raise
            return e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001  an unexpected error: its traceback belongs in the run's log too
            traceback.print_exc()
            return 1

    def checkpoint(self):
        import submitit
        # submitit requeues the job next and leaves through SystemExit; the SIGTERM of that requeue must not
        # interrupt the run's closing (its last checkpoint being finalised)
        self._requeueing = True
        return submitit.helpers.DelayedSubmission(self)


# --------------------------------------------------------------------------------------------------------------
# Submitting


def _options(items) -> Dict[str, object]:
    """``slurm.additional_parameters`` entries ``key=value`` or ``flag`` (with or without ``--``) as sbatch options."""
    out: Dict[str, object] = {}
    for item in items or ():
        key, sep, value = str(item).lstrip("-").partition("=")
        key = key.strip()
        if not key:
            continue
        if key in RESERVED_OPTIONS:
            raise ValueError(f"slurm.additional_parameters sets --{key}, which the sweep sets itself per job: drop it")
        out[key] = value.strip() if sep else True
    return out


def sbatch_parameters(settings, task: str, dependency: Sequence[str]) -> dict:
    """submitit's SlurmExecutor parameters of one job (or array) of ``task`` waiting on ``dependency``."""
    params = dict(job_name=f"{settings.job_name}-{task}", time=int(settings.time),
                  cpus_per_task=int(settings.cpus_per_task), array_parallelism=int(settings.array_parallelism),
                  wckey=None, setup=list(settings.setup or ()))
    if int(settings.gpus_per_node or 0) > 0:
        params["gpus_per_node"] = int(settings.gpus_per_node)
    if settings.mem_gb:
        params["mem"] = f"{int(round(float(settings.mem_gb) * 1024))}M"
    for name in ("partition", "qos", "account", "constraint"):
        if settings.get(name):
            params[name] = str(settings[name])
    extra = _options(settings.additional_parameters)
    extra["requeue"] = True  # preemption and `scontrol requeue` rerun the job, also where JobRequeue=0
    if dependency:
        extra["dependency"] = "afterok:" + ":".join(dependency)
        extra["kill-on-invalid-dep"] = "yes"
    params["additional_parameters"] = extra
    return params


def describe_options(settings) -> str:
    params = sbatch_parameters(settings, "<task>", ())
    shown = [f"--partition={params.get('partition', '<default>')}", f"--time={params['time']}",
             f"--cpus-per-task={params['cpus_per_task']}"]
    shown += [f"--{k.replace('_', '-')}={params[k]}" for k in ("gpus_per_node", "mem", "qos", "account", "constraint")
              if k in params]
    shown += [f"--{k}" if v is True else f"--{k}={v}" for k, v in params["additional_parameters"].items()]
    if params["setup"]:
        shown.append(f"setup: {'; '.join(params['setup'])}")
    return " ".join(shown)


@dataclasses.dataclass
class Group:
    """One sbatch call: runs of one stage and task waiting on the same jobs (an array when there are several)."""
    task: str
    runs: List[Run]
    dependency: List[str]
    job_ids: List[str] = dataclasses.field(default_factory=list)


def _executor(root: str, settings, task: str, dependency: Sequence[str]):
    try:
        import submitit
    except ImportError:
        raise SlurmError("executor=slurm needs submitit: pip install 'kdjax[slurm]'") from None
    try:
        executor = submitit.SlurmExecutor(folder=os.path.join(root, "slurm", "%j"),
                                          max_num_timeout=int(settings.max_timeouts), python=settings.python)
    except RuntimeError as e:  # submitit's "Could not detect srun"
        raise SlurmError(f"executor=slurm: {e}") from None
    executor.update_parameters(**sbatch_parameters(settings, task, dependency))
    return executor


def _chunks(runs: List[Run], size: int) -> List[List[Run]]:
    return [runs[i:i + size] for i in range(0, len(runs), size)] or [[]]


class SlurmSweep:
    """Reconciles the plan with SLURM: ``assess`` where each run stands, ``submit`` what is missing."""

    MAX_ARRAY = 1000  # SLURM's default MaxArraySize is 1001

    def __init__(self, root: str, runs: Sequence[Run], settings, max_retries: int, log=print):
        self.root, self.runs, self.settings, self.max_retries, self.log = root, list(runs), settings, max_retries, log
        self.inputs = inputs_of(self.runs)
        self.record = Record(root)

    def assess(self) -> Dict[str, RunState]:
        return assess(self.runs, self.inputs, self.record, self.max_retries)

    def plan_groups(self, states: Dict[str, RunState], resubmit_cancelled: bool = True) -> List[Group]:
        """The sbatch calls that would bring every unfinished run on its way, stage by stage; a new job's
        dependencies name jobs queued or running now, or jobs of earlier groups of the same pass (as ``#k``
        until submitted). A queued job waiting on a run that is being resubmitted is replaced (``superseded``):
        its dependency can no longer be satisfied."""
        wanted = {w for w, rs in states.items() if rs.to_submit and (resubmit_cancelled or rs.status != "cancelled")}
        changed = True
        while changed:  # queued dependants of resubmitted runs must follow them
            changed = False
            for w, rs in states.items():
                if w not in wanted and rs.status == "active" and rs.state == "PENDING" and \
                        any(p.workdir in wanted for p in self.inputs[w]):
                    wanted.add(w)
                    changed = True
        groups: List[Group] = []
        new_ids: Dict[str, str] = {}
        for stage in sorted({states[w].run.stage for w in wanted}):
            keyed: Dict[Tuple[str, Tuple[str, ...]], List[Run]] = {}
            for run in self.runs:
                if run.workdir not in wanted or run.stage != stage:
                    continue
                dependency, waiting = [], False
                for parent in self.inputs[run.workdir]:
                    ps = states[parent.workdir]
                    if parent.workdir in new_ids:
                        dependency.append(new_ids[parent.workdir])
                    elif ps.status == "active":
                        dependency.append(ps.job["job_id"])
                    elif ps.status != "done":  # an input not resubmitted in this pass (one cancelled by the user)
                        waiting = True
                    # a finished input needs no dependency (and its job may already be forgotten by SLURM)
                if not waiting:
                    keyed.setdefault((run.task, tuple(dependency)), []).append(run)
            for (task, dependency), members in keyed.items():
                for chunk in _chunks(members, self.MAX_ARRAY):
                    group = Group(task, chunk, list(dependency))
                    k = len(groups) + 1
                    group.job_ids = [f"#{k}"] if len(chunk) == 1 else [f"#{k}_{i}" for i in range(len(chunk))]
                    groups.append(group)
                    new_ids.update({r.workdir: j for r, j in zip(chunk, group.job_ids)})
        return groups

    def submit(self, groups: List[Group], states: Dict[str, RunState]) -> int:
        """Submit ``groups`` in order (a placeholder ``#k`` in a dependency becomes that group's job id), saving
        the record after each sbatch call; returns the number of jobs submitted."""
        real: Dict[str, str] = {}
        superseded = [states[r.workdir] for g in groups for r in g.runs if states[r.workdir].status == "active"]
        if superseded:
            scancel([rs.job["job_id"] for rs in superseded])
            for rs in superseded:
                self.record.mark_superseded(rs.run)
            self.log(f"[sweep] cancelled {len(superseded)} queued job(s) waiting on runs that are resubmitted now")
        active = [rs.job["job_id"] for rs in states.values() if rs.status == "active" and rs not in superseded]
        for group in groups:
            for run in group.runs:
                clear_lock_of_ended_job(run.workdir, [j["job_id"] for j in self.record.jobs(run)], active, self.log)
        count = 0
        for group in groups:
            dependency = [real.get(d, d) for d in group.dependency]
            executor = _executor(self.root, self.settings, group.task, dependency)
            try:
                with executor.batch():
                    jobs = [executor.submit(RunJob(command_line(run)[3:], run.workdir)) for run in group.runs]
            except Exception as e:  # sbatch's refusal arrives as several exception types; its text says why
                self.record.save()
                raise SlurmError(f"sbatch refused {len(group.runs)} {group.task} job(s): "
                                 f"{str(e).strip().splitlines()[-1][:300]}") from None
            for run, job, placeholder in zip(group.runs, jobs, group.job_ids):
                real[placeholder] = str(job.job_id)
                self.record.add_job(run, str(job.job_id), str(job.paths.stdout), dependency)
            self.record.save()
            count += len(jobs)
            first = str(jobs[0].job_id).split("_")[0]
            shape = f"job {first}" if len(jobs) == 1 else f"array {first} ({len(jobs)} jobs)"
            self.log(f"[sweep] submitted {group.task} {shape}"
                     + (f", afterok:{':'.join(dependency)}" if dependency else ""))
        return count


# --------------------------------------------------------------------------------------------------------------
# The actions


def counts(states: Dict[str, RunState]) -> Dict[str, int]:
    out = dict.fromkeys(("done", "running", "queued", "failed", "cancelled", "new", "gave_up", "blocked"), 0)
    for rs in states.values():
        if rs.status == "active":
            out["running" if rs.state in ("RUNNING", "COMPLETING", "CONFIGURING") else "queued"] += 1
        else:
            out[rs.status] += 1
    return out


def summary(states: Dict[str, RunState], max_retries: int) -> str:
    c = counts(states)
    text = (f"{len(states)} runs: {c['done']} finished, {c['running']} running, {c['queued']} queued, "
            f"{c['failed']} failed (to resubmit), {c['cancelled']} cancelled, {c['new']} to submit, "
            f"{c['gave_up']} given up after {max_retries} retries, {c['blocked']} blocked by those")
    return text


def _state_lines(states: Dict[str, RunState], record: Record) -> List[str]:
    lines = []
    for rs in states.values():
        if rs.status == "done":
            continue
        job = rs.job["job_id"] if rs.job else "-"
        what = record.describe(rs.run)
        if rs.status == "active":
            label = rs.state + (f" ({rs.reason})" if rs.reason and rs.reason != "None" else "")
        elif rs.status == "new":
            end = " ".join(x for x in (rs.state, rs.reason if rs.reason != "None" else "") if x)
            label = "NOT STARTED" + (f" ({end})" if end else "") if rs.job else "NOT SUBMITTED"
        else:
            label = {"failed": "FAILED", "gave_up": "GAVE UP", "blocked": "BLOCKED", "cancelled": "CANCELLED"
                     }[rs.status]
            end = rs.state or ("gone from squeue" if rs.job else "")
            label += f" ({end}, {rs.attempts} attempt(s))" if end else f" ({rs.attempts} attempt(s))"
        line = f"  {label:<34} {job:<10} {what}"
        if rs.status in ("failed", "gave_up"):
            log = os.path.join(rs.run.workdir, LOG)
            if not os.path.exists(log) and rs.job and rs.job.get("stdout"):
                log = rs.job["stdout"][:-len(".out")] + ".err"  # it failed before kdjax started: the job's own
            error = last_line(log)
            line += (f"\n      {error}" if error else "") + f"\n      log: {log}"
        lines.append(line)
    return lines


def status(root: str, max_retries: int, log=print) -> Dict[str, RunState]:
    """action=status: where each recorded run stands (read-only; no lock, nothing submitted)."""
    record = Record(root)
    if not record.data["runs"]:
        raise SlurmError(f"no SLURM jobs recorded in {os.path.join(root, RECORD)}: submit the sweep first "
                         f"(--config.executor=slurm)")
    runs, inputs = record.runs()
    states = assess(runs, inputs, record, max_retries)
    log(f"[sweep] slurm status of {root}: {summary(states, max_retries)}")
    for line in _state_lines(states, record):
        log(line)
    return states


def cancel(root: str, max_retries: int, log=print) -> List[str]:
    """action=cancel: scancel every queued or running job of the sweep; finished runs are kept, and the next
    sweep command resubmits the cancelled ones."""
    record = Record(root)
    runs, inputs = record.runs()
    states = assess(runs, inputs, record, max_retries)
    ids = [rs.job["job_id"] for rs in states.values() if rs.status == "active"]
    scancel(ids)
    path = os.path.join(root, CANCELLED)
    _write_json(path, sorted(cancelled_ids(root) | set(ids)))
    log(f"[sweep] cancelled {len(ids)} job(s) of {root}" + (f": {', '.join(ids[:20])}" if ids else "")
        + ("; the next `kdjax sweep` command with the same config resubmits their runs" if ids else ""))
    return ids


def dry_run(root: str, runs: Sequence[Run], settings, max_retries: int, log=print) -> List[Group]:
    """The sbatch calls the sweep would make now, with their dependencies; submits nothing, writes nothing."""
    sweep = SlurmSweep(root, runs, settings, max_retries, log)
    states = sweep.assess()
    groups = sweep.plan_groups(states)
    total = sum(len(g.runs) for g in groups)
    log(f"[sweep] dry run, nothing submitted: {summary(states, max_retries)}")
    log(f"[sweep] would submit {total} job(s) in {len(groups)} sbatch call(s), each with: {describe_options(settings)}")
    for k, group in enumerate(groups, 1):
        after = f"afterok:{':'.join(group.dependency)}, --kill-on-invalid-dep=yes" if group.dependency \
            else "no dependency"
        shape = "1 job" if len(group.runs) == 1 else f"array of {len(group.runs)} (%{settings.array_parallelism})"
        log(f"  sbatch #{k}: {group.task}, {shape}, {after}")
        for run, job_id in zip(group.runs, group.job_ids):
            log(f"    {job_id:<8} {run.describe()}")
    return groups


@dataclasses.dataclass
class SlurmOutcome:
    states: Dict[str, RunState]
    submitted: int
    max_retries: int

    @property
    def finished(self) -> bool:
        return all(rs.status == "done" for rs in self.states.values())

    @property
    def failed(self) -> List[Run]:
        return [rs.run for rs in self.states.values() if rs.status in ("gave_up", "blocked")]

    @property
    def active(self) -> int:
        return sum(rs.status == "active" for rs in self.states.values())

    def summary(self) -> str:
        return f"{summary(self.states, self.max_retries)}; {self.submitted} job(s) submitted by this command"


def run(root: str, runs: Sequence[Run], settings, max_retries: int, poll_s: float = 10.0, log=print) -> SlurmOutcome:
    """action=run: submit every unfinished run (resubmitting failed ones up to ``max_retries`` times); with
    ``slurm.wait`` keep reconciling until no job is queued or running."""
    from kdjax.workdir import WorkdirLock
    os.makedirs(root, exist_ok=True)
    if settings.check_shared_fs:
        check_shared_filesystem(root, settings.partition, log)
    # one submitter at a time: two at once would both submit the missing runs
    with WorkdirLock(root):
        sweep = SlurmSweep(root, runs, settings, max_retries, log)
        states = sweep.assess()
        for rs in states.values():  # a finished run whose input changed since is set aside and rerun
            if rs.status == "done" and stale(rs.run):
                set_aside(rs.run, log)
        states = sweep.assess()
        sweep.record.set_plan(runs, sweep.inputs)
        sweep.record.save()
        submitted, first = 0, True
        try:
            while True:
                groups = sweep.plan_groups(states, resubmit_cancelled=first)
                if groups:
                    submitted += sweep.submit(groups, states)
                    states = sweep.assess()
                first = False
                if not settings.wait:
                    break
                if not any(rs.status == "active" for rs in states.values()) and \
                        not any(rs.to_submit and rs.status != "cancelled" for rs in states.values()):
                    break
                if any(rs.status == "cancelled" for rs in states.values()):
                    log("[sweep] jobs of this sweep were cancelled (action=cancel): stopped waiting")
                    break
                time.sleep(poll_s)
                states = sweep.assess()
        except KeyboardInterrupt:
            log(f"[sweep] stopped waiting; the submitted jobs keep running: follow them with --config.action=status "
                f"--workdir={root}")
            raise
    outcome = SlurmOutcome(states, submitted, max_retries)
    for line in _state_lines(states, sweep.record):
        log(line)
    return outcome

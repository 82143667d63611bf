"""The sweep's own record of the jobs it submitted (``slurm_jobs.json``) and where each run stands (``assess``):
finished (its done marker), active in SLURM, failed, waiting on a failed input, or to submit."""
import dataclasses
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple


from kdjax.sweep.grid import Run
from kdjax.sweep.slurm.queue import ACTIVE_STATES, SlurmError, job_states, sacct_states

RECORD = "slurm_jobs.json"
LOG = "launch.log"                   # in a run's workdir: its output, a job's included
CANCELLED = "slurm_cancelled.json"   # ids stopped by action=cancel (their runs are resubmitted only on request)


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

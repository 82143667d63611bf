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
import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Sequence


from kdjax.sweep.executor import set_aside, stale
from kdjax.sweep.grid import Run
from kdjax.sweep.slurm.job import (STARTS, RunJob, clear_lock_of_ended_job,  # noqa: F401
                                   take_over_previous_incarnation)
from kdjax.sweep.slurm.queue import (ACTIVE_STATES, SlurmError, check_shared_filesystem,  # noqa: F401
                                     filesystem_of, scancel)
from kdjax.sweep.slurm.record import (CANCELLED, LOG, RECORD, Record, RunState, _write_json, assess,  # noqa: F401
                                      cancelled_ids, last_line)
from kdjax.sweep.slurm.submit import Group, SlurmSweep, describe_options, sbatch_parameters  # noqa: F401

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


def run(root: str, runs: Sequence[Run], settings, max_retries: int, run_command: Callable[[Any, str], int],
        poll_s: float = 10.0, log=print) -> SlurmOutcome:
    """action=run: submit every unfinished run (resubmitting failed ones up to ``max_retries`` times); with
    ``slurm.wait`` keep reconciling until no job is queued or running."""
    from kdjax.workdir import WorkdirLock
    os.makedirs(root, exist_ok=True)
    if settings.check_shared_fs:
        check_shared_filesystem(root, settings.partition, log)
    # one submitter at a time: two at once would both submit the missing runs
    with WorkdirLock(root):
        sweep = SlurmSweep(root, runs, settings, max_retries, log, run_command)
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

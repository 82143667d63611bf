"""Submitting: sbatch parameters, job arrays per stage and input, ``afterok`` dependencies (``SlurmSweep``)."""
import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


from kdjax.sweep.executor import inputs_of
from kdjax.sweep.grid import Run
from kdjax.sweep.slurm.job import RunJob, clear_lock_of_ended_job
from kdjax.sweep.slurm.queue import SlurmError, scancel
from kdjax.sweep.slurm.record import Record, RunState, assess

# sbatch options the sweep sets itself, per job
RESERVED_OPTIONS = ("dependency", "kill-on-invalid-dep", "array", "output", "error", "open-mode", "signal")


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

    def __init__(self, root: str, runs: Sequence[Run], settings, max_retries: int, log=print,
                 run_command: Optional[Callable[[Any, str], int]] = None):
        """``run_command``: what each submitted job runs (``RunJob``); only ``submit`` needs it."""
        self.root, self.runs, self.settings, self.max_retries, self.log = root, list(runs), settings, max_retries, log
        self.run_command = run_command
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
                    jobs = [executor.submit(RunJob(run, self.run_command)) for run in group.runs]
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

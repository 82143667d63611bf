"""Running a sweep's planned runs: in this process one after the other (no start-up per run: the tests and the
demo), or as ``python -m kdjax`` subprocesses, ``parallel`` at a time (several runs share one accelerator, each
with a fraction of its memory). A run whose done marker exists is skipped; an interrupted one resumes from its
checkpoints.

The executor knows nothing of the tasks: the in-process one calls the ``run_task(task, config, workdir)`` it is
given (``kdjax.tasks.run``), the subprocess one starts the command line.
"""
import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from kdjax import configs
from kdjax.sweep.grid import Run
from kdjax.errors import KdjaxError


class SweepFailed(KdjaxError, RuntimeError):
    """Some runs of a sweep failed (the others ran, and their results are kept)."""


def is_interruption(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, as the task reports it: the sweep stops instead of counting the run as failed."""
    from kdjax.train.loop import RunInterrupted
    return isinstance(error, (KeyboardInterrupt, RunInterrupted))


def build_config(run: Run):
    """The run's ConfigDict: its task's defaults with the run's fields set (fields a task lacks are skipped)."""
    config = configs.task_config(run.task)
    for name, value in run.fields:
        node, parts = config, name.split(".")
        for part in parts[:-1]:
            node = node[part] if part in node else None
            if node is None:
                break
        if node is not None and parts[-1] in node:
            node[parts[-1]] = value
    return config


# The fields through which a run consumes another run's workdir (a teacher, the student that scores a scheme).
INPUT_FIELDS = ("teacher_checkpoint", "student_checkpoint")


def inputs_of(runs: Sequence[Run]) -> Dict[str, List[Run]]:
    """{run's workdir: the runs of ``runs`` it consumes}: those whose workdir one of its input fields names. A
    checkpoint given from outside the sweep is no run's workdir, so it is no dependency."""
    by_workdir = {os.path.abspath(r.workdir): r for r in runs}
    out = {}
    for run in runs:
        named = [os.path.abspath(str(v)) for k, v in run.fields if k in INPUT_FIELDS and v]
        out[run.workdir] = [by_workdir[p] for p in dict.fromkeys(named) if p in by_workdir]
    return out


def _text(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def command_line(run: Run) -> List[str]:
    """``python -m kdjax <task> --config.<field>=<value> ... --workdir=<run's workdir>``."""
    config = build_config(run)
    args = [sys.executable, "-m", "kdjax", run.task, f"--workdir={run.workdir}"]
    for name, value in run.fields:
        if name.split(".")[0] in config:
            args.append(f"--config.{name}={_text(value)}")
    return args


def run_subprocess(run: Run, memory_fraction: Optional[float]) -> int:
    env = dict(os.environ)
    if memory_fraction:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{memory_fraction:.3f}"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "launch.log"), "a") as log:
        return subprocess.call(command_line(run), env=env, stdout=log, stderr=subprocess.STDOUT)


class Progress:
    """"run 14/290, ETA 3:10:00" across all stages: the mean wall time of the runs finished in this session
    times the runs left (the first run's compile is in it; later runs of a pair compile the same programs)."""

    def __init__(self, total: int, log):
        self.total, self.log, self.done, self.seconds = total, log, 0, 0.0

    def eta(self) -> str:
        from kdjax.runlog import format_eta
        return format_eta(self.seconds / self.done * (self.total - self.done)) if self.done else "?"

    def start(self, run: Run) -> None:
        self.log(f"[sweep] run {self.done + 1}/{self.total}, ETA {self.eta()}: {run.describe()}")

    def finish(self, seconds: float) -> None:
        self.done += 1
        self.seconds += seconds


@dataclasses.dataclass
class Outcome:
    """What ``execute`` did: runs completed now, skipped (finished before), failed; and its wall time."""
    completed: List[Run]
    skipped: List[Run]
    failed: List[Run]
    wall_s: float

    def summary(self) -> str:
        return (f"{len(self.completed)} done, {len(self.skipped)} skipped (finished before), {len(self.failed)} "
                f"failed, in {self.wall_s / 60:.1f} min")


def execute(runs: Sequence[Run], run_task: Callable[[str, Any, str], Dict[str, Any]], parallel: int = 1,
            log=print) -> Outcome:
    """Run every unfinished run, stage by stage (a finished run whose input changed is set aside and rerun). A
    failure does not stop the others; a run that consumes a failed one fails on its own, in one line, because
    it refuses unfinished inputs."""
    started = time.time()
    for run in runs:
        if stale(run):
            set_aside(run, log)
    skipped = [r for r in runs if r.done]
    todo = [r for r in runs if not r.done]
    log(f"[sweep] {len(runs)} runs, {len(skipped)} already finished, {len(todo)} to go "
        f"({'in this process' if parallel <= 1 else f'{parallel} processes at a time'})")
    progress, completed, failed = Progress(len(todo), log), [], []
    for stage in sorted({r.stage for r in todo}):
        batch = [r for r in todo if r.stage == stage]
        if parallel <= 1:
            for run in batch:
                progress.start(run)
                t0 = time.time()
                try:
                    os.makedirs(run.workdir, exist_ok=True)
                    run_task(run.task, build_config(run), run.workdir)
                    completed.append(run)
                except Exception as e:  # one failed run must not lose the others; reported at the end
                    if is_interruption(e):
                        raise
                    log(f"[sweep] FAILED: {run.describe()}: {type(e).__name__}: {e}")
                    failed.append(run)
                progress.finish(time.time() - t0)
            continue
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            def timed(run):
                t0 = time.time()
                return run, run_subprocess(run, 0.9 / parallel), time.time() - t0
            for run, code, seconds in pool.map(timed, batch):
                progress.finish(seconds / parallel)
                log(f"[sweep] {'done' if code == 0 else f'FAILED ({code})'} ({progress.done}/{progress.total}, "
                    f"ETA {progress.eta()}): {run.describe()}")
                (failed if code else completed).append(run)
    return Outcome(completed, skipped, failed, time.time() - started)


def _recorded_inputs(run: Run) -> Dict[str, Dict[str, Any]]:
    """{role: record} of the inputs a finished run recorded in its results.json files (an all-schemes T. stddev
    run has one per scheme, all with the same inputs)."""
    import glob
    import json
    paths = [os.path.join(run.workdir, "results.json")] + sorted(glob.glob(os.path.join(run.workdir, "*",
                                                                                        "results.json")))
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                return dict(json.load(f).get("inputs", {}))
    return {}


def _started_inputs(run: Run) -> Dict[str, Dict[str, Any]]:
    """{role: {"digest": ...}} of the inputs an unfinished run recorded when it started (``kdjax.workdir.claim``)."""
    import json
    from kdjax.workdir import INPUTS
    try:
        with open(os.path.join(run.workdir, INPUTS)) as f:
            return {role: {"digest": digest} for role, digest in json.load(f).items()}
    except (OSError, ValueError, AttributeError):
        return {}


class InputUnreadable(ValueError):
    """A run's input exists but cannot be read: an error to fix, never taken for a changed input."""


def current_digest(path: str, consumer: Run) -> Optional[str]:
    """The content digest of the checkpoint ``path`` names, or None when it is gone or its run is unfinished (it
    will be rebuilt, so whatever consumed it is out of date). One that exists but cannot be read raises: a
    briefly unreadable teacher must not move its finished dependants aside."""
    from kdjax.checkpoint import CheckpointError, read_meta
    from kdjax.checkpoint.store import CHECKPOINT_SUBDIR
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        return None
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)) and not os.path.exists(os.path.join(path, "results.json")):
        return None  # an unfinished (or set aside and restarted) run of the sweep
    try:
        return read_meta(path).get("digest")
    except (CheckpointError, OSError) as e:
        raise InputUnreadable(f"cannot read {path}, an input of {consumer.workdir} ({e}); an unreadable input is "
                              f"not a change: make it readable and start the sweep again") from None


def _role(field: str) -> str:
    return field[:-len("_checkpoint")]  # teacher_checkpoint -> teacher, the key of results.json's "inputs"


def stale(run: Run) -> bool:
    """A run (finished, or started and unfinished) whose recorded input differs, by content digest, from the
    checkpoint its input field names now (a teacher retrained or resumed since): its results were built, or its
    training began, on something else, so it must be run again from scratch. Inputs are located by the run's
    fields, i.e. relative to the sweep as planned now, so that a moved or copied sweep is still finished."""
    named = {_role(field): str(path) for field, path in run.fields if field in INPUT_FIELDS and path}
    for role, record in (_recorded_inputs(run) if run.done else _started_inputs(run)).items():
        want = (record or {}).get("digest")
        path = named.get(role, (record or {}).get("path"))  # a run planned without that field: where it was
        if want is not None and path and current_digest(path, run) != want:
            return True
    return False


STALE_SUFFIX = ".stale-"


def is_set_aside(path: str) -> bool:
    """Whether ``path`` is a run's outputs moved aside by ``set_aside`` (``<run>.stale-N``): kept for reference,
    never counted as a run."""
    name = os.path.basename(os.path.normpath(path))
    head, sep, tail = name.rpartition(STALE_SUFFIX)
    return bool(sep and head and tail.isdigit())


def set_aside(run: Run, log=print) -> str:
    """Move a stale run's outputs out of the way (kept, never deleted) so that it reruns from scratch."""
    n = 1
    while os.path.exists(f"{run.workdir}{STALE_SUFFIX}{n}"):
        n += 1
    target = f"{run.workdir}{STALE_SUFFIX}{n}"
    os.replace(run.workdir, target)
    log(f"[sweep] {run.describe()}: its recorded input changed; old outputs moved to {target}, rerunning")
    return target

"""``shard=i/n``: n processes, started any way at all (PBS, LSF, Kubernetes jobs, ssh, a shell loop), share one
sweep workdir on a shared filesystem and finish its grid together, every run executed once.

Each shard repeatedly takes the next run that is unfinished, not locked by another process, not given up, and
whose inputs are finished; ``i/n`` only sets where in the plan it starts looking, so that the shards do not all
queue on the same run. Taking a run is acquiring its workdir lock (``kdjax.workdir.WorkdirLock``: atomic on the
filesystem, with a heartbeat, and a lock whose holder died is taken over), then checking again that it is
unfinished: another shard may have finished it between the look and the lock. The run then runs in the shard's
process. A failure is recorded in the run's workdir (``sweep_failures.jsonl``) so that every shard sees it; a run
is retried ``max_retries`` times in all, then given up, and the runs that consume it are reported as blocked.
A shard waits (``poll_s``) while runs it could take later are still running elsewhere, and ends when every run
is finished, given up or blocked.
"""
import json
import os
import socket
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

from kdjax.interrupts import stop_on_sigterm
from kdjax.sweep.executor import Outcome, build_config, inputs_of, is_interruption, set_aside, stale
from kdjax.sweep.grid import Run

FAILURES = "sweep_failures.jsonl"


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard={text!r} is not of the form i/n (e.g. --config.shard=0/4 ... 3/4)") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard={text!r}: need n >= 1 and 0 <= i < n (shards 0/{max(count, 1)} to "
                         f"{max(count, 1) - 1}/{max(count, 1)})")
    return index, count


def failures(run: Run) -> int:
    try:
        with open(os.path.join(run.workdir, FAILURES)) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _record_failure(run: Run, shard: str, error: BaseException) -> None:
    with open(os.path.join(run.workdir, FAILURES), "a") as f:
        f.write(json.dumps({"shard": shard, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                            "error": f"{type(error).__name__}: {error}"[:500]}) + "\n")


def _try_lock(run: Run):
    """The run's workdir lock, or None when another live process holds it."""
    from kdjax.workdir import WorkdirBusy, WorkdirLock
    os.makedirs(run.workdir, exist_ok=True)
    lock = WorkdirLock(run.workdir)
    try:
        return lock.acquire()
    except WorkdirBusy:
        return None


def _set_aside_stale(runs: Sequence[Run], log) -> None:
    """A run whose recorded input changed (finished, or started and unfinished) is moved away (under its lock, so that no shard is using it)."""
    for run in runs:
        if stale(run):
            lock = _try_lock(run)
            if lock is None:
                continue
            try:
                still = stale(run)
            finally:
                lock.release()
            if still:
                set_aside(run, log)


def run_shard(runs: Sequence[Run], run_task: Callable[[str, Any, str], Dict[str, Any]], index: int, count: int,
              max_retries: int = 2, poll_s: float = 10.0, log=print) -> Outcome:
    """Take and run runs until none is left for any shard (module docstring). ``completed`` are the runs this
    shard executed; ``skipped`` those finished before it started; ``failed`` those given up or blocked."""
    started = time.time()
    name = f"{index}/{count}"
    runs = list(runs)
    inputs = inputs_of(runs)
    _set_aside_stale(runs, log)
    skipped = [r for r in runs if r.done]
    start = index * len(runs) // count
    order = runs[start:] + runs[:start]
    log(f"[sweep] shard {name}: {len(runs)} runs, {len(skipped)} already finished; starting at run {start + 1}")
    completed: List[Run] = []
    waiting_said = False
    while True:
        given_up = {r.workdir for r in runs if not r.done and failures(r) > max_retries}
        blocked = set()
        for run in runs:  # plan order: inputs come first, so blocking propagates in one pass
            if not run.done and run.workdir not in given_up and \
                    any(p.workdir in given_up or p.workdir in blocked for p in inputs[run.workdir]):
                blocked.add(run.workdir)
        open_runs = [r for r in order if not r.done and r.workdir not in given_up and r.workdir not in blocked]
        if not open_runs:
            break
        taken = None
        for run in open_runs:
            if not all(p.done for p in inputs[run.workdir]):
                continue
            lock = _try_lock(run)
            if lock is None:
                continue
            if run.done or failures(run) > max_retries:  # finished or given up by another shard meanwhile
                lock.release()
                continue
            taken = (run, lock)
            break
        if taken is None:
            if not waiting_said:
                log(f"[sweep] shard {name}: {len(open_runs)} run(s) left, all running elsewhere or waiting for their "
                    f"inputs; polling every {poll_s:g} s")
                waiting_said = True
            time.sleep(poll_s)
            continue
        waiting_said = False
        run, lock = taken
        log(f"[sweep] shard {name} runs: {run.describe()}")
        try:
            with stop_on_sigterm():
                run_task(run.task, build_config(run), run.workdir)
            completed.append(run)
        except Exception as e:  # one failed run must not stop the shard; recorded for every shard to see
            if is_interruption(e):
                raise
            _record_failure(run, name, e)
            log(f"[sweep] shard {name} FAILED ({failures(run)} of {max_retries + 1} attempts): {run.describe()}: "
                f"{type(e).__name__}: {e}")
        finally:
            lock.release()
    failed = [r for r in runs if not r.done]
    log(f"[sweep] shard {name}: ran {len(completed)}; {len(runs) - len(failed)} of {len(runs)} runs finished"
        + (f", {len(failed)} given up or blocked" if failed else ""))
    return Outcome(completed, skipped, failed, time.time() - started)

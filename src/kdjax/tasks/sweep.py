"""Task 'sweep': check every input, plan the grid, run what is missing (skipping finished runs, resuming
interrupted ones), report, and end with one summary.

Where the runs run: ``executor=local`` in this process (or ``parallel`` subprocesses), ``executor=slurm`` as SLURM
jobs (``kdjax.sweep.slurm``; ``action=status`` / ``action=cancel`` follow and stop them), or ``shard=i/n``: one of
n processes sharing the workdir (``kdjax.sweep.shards``). ``dry_run`` says what would run, or be submitted."""
import os
import time

from kdjax import configs, sweep, tasks
from kdjax.sweep import shards


def _load_error(name: str, config) -> str:
    """'' when the dataset loads here, else its first line of error (which says how to provide it)."""
    from kdjax import data
    try:
        data.load(name, **data.config_options(config))
        return ""
    except (FileNotFoundError, ValueError) as e:
        return str(e).splitlines()[0]


def available_datasets(config) -> list:
    """The sweep's datasets, plus each optional one whose data can be loaded here."""
    kept = list(config.datasets)
    for name in config.optional_datasets:
        problem = _load_error(name, config)
        if problem:
            print(f"[sweep] {name} is not available here, skipped: {problem}", flush=True)
        else:
            kept.append(name)
    return kept


def missing_inputs(config) -> list:
    """One line per dataset or given teacher checkpoint that is not there, saying how to provide it."""
    from kdjax.checkpoint import CheckpointError, resolve_step_dir
    problems = [f"dataset {name}: {problem}" for name in config.datasets
                if (problem := _load_error(name, config))]
    for model, path in sweep.grid.given_teachers(config).items():
        try:
            resolve_step_dir(path)
        except CheckpointError as e:
            problems.append(f"teacher_checkpoints.{model}: {e}")
    return problems


def report_missing_inputs(config) -> None:
    """A dry run names what the real run would stop on."""
    for problem in missing_inputs(config):
        print(f"[sweep] missing, the sweep would not start: {problem}", flush=True)


def preflight(config, runs) -> None:
    """Every dataset and given teacher checkpoint, before any run starts or any directory is made: one line per
    missing thing, saying how to provide it."""
    problems = missing_inputs(config)
    if problems:
        raise ValueError(f"the sweep cannot start ({len(runs)} runs planned, none started):\n" + "\n".join(problems))


def check_mode(config) -> None:
    """distillers, executor, action, shard and their combinations, before anything is planned or loaded."""
    from kdjax.configs.sweep import ACTIONS, EXECUTORS
    from kdjax.sweep.grid import parse_distillers
    parse_distillers(config.get("distillers", ("kd",)))  # a mistyped distiller fails here, before any data is looked at
    if config.executor not in EXECUTORS:
        raise ValueError(f"executor={config.executor!r}: choose one of {', '.join(EXECUTORS)}")
    if config.action not in ACTIONS:
        raise ValueError(f"action={config.action!r}: choose one of {', '.join(ACTIONS)}")
    if int(config.max_retries) < 0:
        raise ValueError(f"max_retries must be >= 0, got {config.max_retries}")
    if config.shard is not None:
        shards.parse_shard(config.shard)
        if config.executor != "local":
            raise ValueError("shard=i/n runs the runs in its own process: use it with executor=local (each shard is "
                             "one process, started by any scheduler)")
        if int(config.parallel) > 1:
            raise ValueError("shard=i/n runs one run at a time: start more shards instead of parallel>1")
    if config.action == "cancel" and config.executor != "slurm":
        raise ValueError("action=cancel stops the SLURM jobs of executor=slurm; a local sweep or shard stops with "
                         "Ctrl-C (an interrupted run resumes when the sweep runs again)")
    if config.executor == "slurm" and int(config.parallel) > 1:
        raise ValueError("parallel>1 starts local processes; with executor=slurm every run is its own job: drop "
                         "parallel")


def _dry_run_local(runs, config) -> None:
    inputs = sweep.executor.inputs_of(runs)
    todo = [r for r in runs if not r.done or sweep.executor.stale(r)]  # as execute will see them
    where = f"shard {config.shard}" if config.shard else "this process" if int(config.parallel) <= 1 else \
        f"{config.parallel} processes at a time"
    print(f"[sweep] dry run, nothing runs: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run "
          f"in {where}:", flush=True)
    for run in todo:
        waits = [p.workdir for p in inputs[run.workdir] if not p.done]
        print(f"  stage {run.stage}: {run.describe()}" + (f" (after {', '.join(waits)})" if waits else ""),
              flush=True)


def _local_status(runs) -> None:
    from kdjax.workdir import LOCK_FILE
    done = [r for r in runs if r.done]
    locked = [r for r in runs if not r.done and os.path.exists(os.path.join(r.workdir, LOCK_FILE))]
    print(f"[sweep] {len(runs)} runs: {len(done)} finished, {len(locked)} locked (running, or left by a process "
          f"that died), {len(runs) - len(done) - len(locked)} not started", flush=True)
    for run in locked:
        print(f"  locked: {run.describe()}", flush=True)


def _write_report(config, workdir):
    if not config.report:
        return None
    tasks.run("report", configs.task_config("report"), workdir)
    return os.path.join(workdir, "report.md")


def _run_slurm(config, workdir, runs, started):
    from kdjax.sweep import slurm
    outcome = slurm.run(workdir, runs, config.slurm, int(config.max_retries), tasks.run_command,
                        poll_s=float(config.poll_s))
    report = _write_report(config, workdir) if outcome.finished else None
    follow = "" if outcome.finished or not outcome.active else \
        "; follow with --config.action=status, stop with --config.action=cancel"
    print(f"[sweep] {outcome.summary()} ({(time.time() - started) / 60:.1f} min)"
          + (f"; report: {report}" if report else "") + follow, flush=True)
    if outcome.failed and not outcome.active:
        raise sweep.SweepFailed(f"{len(outcome.failed)} of {len(runs)} runs failed {config.max_retries + 1} times or "
                                f"wait on such a run (see `--config.action=status` and their launch.log): "
                                + "; ".join(r.describe() for r in outcome.failed[:5]))
    return {"runs": len(runs), "submitted": outcome.submitted, "finished": outcome.finished}


def run(config, workdir):
    started = time.time()
    config = config.copy_and_resolve_references()
    check_mode(config)
    if config.executor == "slurm" and config.action in ("status", "cancel"):
        from kdjax.sweep import slurm  # the record names the runs: no data, no plan needed
        if config.action == "status":
            states = slurm.status(workdir, int(config.max_retries))
            return {"runs": len(states), **slurm.counts(states)}
        return {"cancelled": slurm.cancel(workdir, int(config.max_retries))}
    with config.unlocked():
        config.datasets = tuple(available_datasets(config))
    runs = sweep.plan(config, workdir)  # every name is checked here, before anything runs
    if config.action == "status":
        _local_status(runs)
        return {"runs": len(runs), "done": sum(r.done for r in runs)}
    if config.dry_run:
        report_missing_inputs(config)
    if config.dry_run and config.executor == "slurm":
        from kdjax.sweep import slurm
        groups = slurm.dry_run(workdir, runs, config.slurm, int(config.max_retries))
        return {"runs": len(runs), "jobs": sum(len(g.runs) for g in groups), "sbatch_calls": len(groups)}
    if config.dry_run:
        _dry_run_local(runs, config)
        return {"runs": len(runs), "to_run": sum(not r.done for r in runs)}
    preflight(config, runs)
    if config.executor == "slurm":
        return _run_slurm(config, workdir, runs, started)
    if config.shard is not None:
        index, count = shards.parse_shard(config.shard)
        outcome = shards.run_shard(runs, tasks.run, index, count, int(config.max_retries),
                                         float(config.poll_s))
        report = _write_report_once(config, workdir) if not outcome.failed else None
    else:
        outcome = sweep.execute(runs, tasks.run, parallel=int(config.parallel))
        report = _write_report(config, workdir)
    print(f"[sweep] {len(runs)} runs: {outcome.summary()} ({(time.time() - started) / 60:.1f} min in all)"
          + (f"; report: {report}" if report else ""), flush=True)
    if outcome.failed:
        where = "their launch.log" if int(config.parallel) > 1 else "the errors printed above"
        raise sweep.SweepFailed(f"{len(outcome.failed)} of {len(runs)} runs failed (see {where}): "
                                + "; ".join(r.describe() for r in outcome.failed[:5]))
    return {"runs": len(runs), "completed": len(outcome.completed), "skipped": len(outcome.skipped)}


def _write_report_once(config, workdir):
    """The shards end at about the same time: one at a time writes the report (under the sweep workdir's lock);
    a shard that finds it taken leaves the report to the one holding it."""
    from kdjax.workdir import WorkdirBusy, WorkdirLock
    try:
        lock = WorkdirLock(workdir).acquire()
    except WorkdirBusy:
        print(f"[sweep] another shard is writing the report in {workdir}", flush=True)
        return None
    try:
        return _write_report(config, workdir)
    finally:
        lock.release()

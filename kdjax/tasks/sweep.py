"""Task 'sweep': check every input, plan the grid, run what is missing (skipping finished runs, resuming
interrupted ones), report, and end with one summary."""
import os
import time

from kdjax import configs, sweep, tasks


def _load_error(name: str, config) -> str:
    """'' when the dataset loads here, else its first line of error (which says how to provide it)."""
    from kdjax import data
    from kdjax.tasks import common
    try:
        data.load(name, **common.data_options(config))
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


def preflight(config, runs) -> None:
    """Every dataset and given teacher checkpoint, before any run starts or any directory is made: one line per
    missing thing, saying how to provide it."""
    from kdjax.checkpoint import CheckpointError, resolve_step_dir
    problems = [f"dataset {name}: {problem}" for name in config.datasets
                if (problem := _load_error(name, config))]
    for model, path in sweep.grid.given_teachers(config).items():
        try:
            resolve_step_dir(path)
        except CheckpointError as e:
            problems.append(f"teacher_checkpoints.{model}: {e}")
    if problems:
        raise ValueError(f"the sweep cannot start ({len(runs)} runs planned, none started):\n" + "\n".join(problems))


def run(config, workdir):
    started = time.time()
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.datasets = tuple(available_datasets(config))
    runs = sweep.plan(config, workdir)  # every name is checked here, before anything runs
    preflight(config, runs)
    outcome = sweep.execute(runs, tasks.run, parallel=int(config.parallel))
    report = None
    if config.report:
        tasks.run("report", configs.task_config("report"), workdir)
        report = os.path.join(workdir, "report.md")
    print(f"[sweep] {len(runs)} runs: {outcome.summary()} ({(time.time() - started) / 60:.1f} min in all)"
          + (f"; report: {report}" if report else ""), flush=True)
    if outcome.failed:
        where = "their launch.log" if int(config.parallel) > 1 else "the errors printed above"
        raise sweep.SweepFailed(f"{len(outcome.failed)} of {len(runs)} runs failed (see {where}): "
                                + "; ".join(r.describe() for r in outcome.failed[:5]))
    return {"runs": len(runs), "completed": len(outcome.completed), "skipped": len(outcome.skipped)}

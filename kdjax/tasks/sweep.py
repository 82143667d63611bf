"""Task 'sweep': plan the grid, run what is missing (skipping finished runs, resuming interrupted ones), report."""
import time

from kdjax import configs, sweep, tasks


def available_datasets(config) -> list:
    """The sweep's datasets, plus each optional one whose data can be loaded here."""
    from kdjax import data
    kept = list(config.datasets)
    for name in config.optional_datasets:
        try:
            data.load(name)
            kept.append(name)
        except (FileNotFoundError, ValueError) as e:
            print(f"[sweep] {name} is not available here, skipped: {str(e).splitlines()[0]}", flush=True)
    return kept


def run(config, workdir):
    started = time.time()
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.datasets = tuple(available_datasets(config))
    runs = sweep.plan(config, workdir)  # every name is checked here, before anything runs
    failed = sweep.execute(runs, tasks.run, parallel=int(config.parallel))
    if config.report:
        tasks.run("report", configs.task_config("report"), workdir)
    if failed:
        where = "their launch.log" if int(config.parallel) > 1 else "the errors printed above"
        raise sweep.SweepFailed(f"{len(failed)} of {len(runs)} runs failed (see {where}): "
                                + "; ".join(r.describe() for r in failed[:5]))
    print(f"[sweep] {len(runs)} runs done in {time.time() - started:.0f} s; report in {workdir}", flush=True)
    return {"runs": len(runs)}

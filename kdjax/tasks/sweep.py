"""Task 'sweep': plan the grid, run what is missing (skipping finished runs, resuming interrupted ones), report."""
from absl import logging

from kdjax import sweep


def available_datasets(names):
    """Datasets marked optional ('name?') are kept only when their data can be loaded here."""
    from kdjax import data
    kept = []
    for name in sweep.split_list(names):
        if not name.endswith("?"):
            kept.append(name)
            continue
        try:
            data.load(name[:-1])
            kept.append(name[:-1])
        except (FileNotFoundError, ValueError) as e:
            logging.info("sweep: %s skipped (%s)", name[:-1], e)
            print(f"[sweep] {name[:-1]} is not available here, skipped: {str(e).splitlines()[0]}", flush=True)
    return "+".join(kept)


def run(config, workdir):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.datasets = available_datasets(config.datasets)
    runs = sweep.plan(config, workdir)  # every name is checked here, before anything runs
    failed = sweep.execute(runs, parallel=int(config.parallel))
    if config.report:
        from kdjax.tasks import report
        report.run(sweep.load_config("report"), workdir)
    if failed:
        where = "their launch.log" if int(config.parallel) > 1 else "the errors printed above"
        raise sweep.SweepFailed(f"{len(failed)} of {len(runs)} runs failed (see {where}): "
                           + "; ".join(r.describe() for r in failed[:5]))
    return {"runs": len(runs)}

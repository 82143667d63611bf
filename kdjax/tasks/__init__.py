"""The tasks: one ``run(config, workdir)`` each, a thin door over the library (``kdjax.configs`` has their
defaults). ``run`` dispatches by name."""
import importlib


def run(task: str, config, workdir: str):
    """Run the task ``task`` (``kdjax.tasks.<task>.run``) with ``config`` in ``workdir``."""
    return importlib.import_module(f"kdjax.tasks.{task}").run(config, workdir)

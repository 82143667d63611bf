"""kdjax command line: ``python launch.py --config=configs/<task>.py[:k=v,...] [--config.a.b=v] --workdir=DIR``.

The config's ``task`` field names the module ``kdjax.tasks.<task>``, whose ``run(config, workdir)`` does the work.
The resolved config is written to ``workdir/config.json`` before anything runs.

``KDJAX_VERBOSE=1`` shows the libraries' INFO logs. ``KDJAX_PLUGINS=module[,module]`` imports modules first: a place to ``kdjax.models.register`` a model or
``kdjax.data.register_source`` a dataset of your own and use it by name from the command line.
"""
import importlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Task config file, e.g. configs/distill.py:teacher=resnet56,student=resnet20.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def _user_errors():
    from kdjax.checkpoint import CheckpointError
    from kdjax.sweep import SweepFailed
    from kdjax.train.loop import TrainingDiverged
    return (ValueError, FileNotFoundError, CheckpointError, TrainingDiverged, SweepFailed)


def import_plugins() -> None:
    for name in filter(None, os.environ.get("KDJAX_PLUGINS", "").split(",")):
        importlib.import_module(name.strip())


def main(argv):
    del argv
    if not os.environ.get("KDJAX_VERBOSE"):  # progress lines are printed; library INFO logs (orbax...) only on demand
        logging.set_verbosity(logging.WARNING)
    import_plugins()
    from kdjax.tasks.common import maybe_initialize_distributed
    maybe_initialize_distributed()  # before anything touches a device
    user_errors = _user_errors()
    config = flags.FLAGS.config
    workdir = os.path.abspath(os.path.expanduser(flags.FLAGS.workdir))
    os.makedirs(workdir, exist_ok=True)
    task = importlib.import_module(f"kdjax.tasks.{config.task}")
    logging.info("task %s, workdir %s", config.task, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1, sort_keys=True, default=str)
    try:
        task.run(config, workdir)
    except user_errors as e:  # bad input: one line that names the fix, no traceback (KDJAX_DEBUG=1 shows it)
        if os.environ.get("KDJAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)

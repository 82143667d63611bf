"""The tasks: one ``run(config, workdir)`` each, a thin frame over the library (``kdjax.tasks.frame``;
``kdjax.configs`` has their defaults). ``run`` dispatches by name; ``run_command`` is what a command line (and a
SLURM job) runs: the task, with bad input ending in one line and an exit status."""
import importlib
import os
import signal
import sys
import warnings

from kdjax.errors import KdjaxError

# Bad input: kdjax's own errors, and the argument checks of the libraries it calls.
USER_ERRORS = (KdjaxError, ValueError, FileNotFoundError)


def run(task: str, config, workdir: str):
    """Run the task ``task`` (``kdjax.tasks.<task>.run``) with ``config`` in ``workdir``."""
    return importlib.import_module(f"kdjax.tasks.{task}").run(config, workdir)


def fail(message: str) -> None:
    for line in str(message).splitlines() or [""]:  # a few problems at once: one line each
        print(f"error: {line}", file=sys.stderr, flush=True)


def ignore_abandoned_saves() -> None:
    """An interrupt can cut short an asynchronous checkpoint save before its coroutines start; the step it was
    writing is abandoned (orbax finalises a step only when its save completes, so the checkpoint the interrupt line
    names is whole), and each unstarted coroutine would print a RuntimeWarning when collected: the one line must
    stay one line."""
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def run_command(config, workdir: str, debug: bool = False) -> int:
    """Run ``config``'s task in ``workdir`` as a command does: library logs only with ``KDJAX_VERBOSE``, the
    distributed runtime started first on a multi-process launch, bad input one line (status 1), Ctrl-C or SIGTERM
    one line naming what stays saved (status 130); a launch that ran records its config (``config.json``)."""
    from absl import logging
    if not os.environ.get("KDJAX_VERBOSE"):  # kdjax prints its own lines; the libraries' logs only on demand
        logging.set_verbosity(logging.ERROR)
    from kdjax import parallel, workdir as workdir_lib
    from kdjax.interrupts import stop_on_sigterm
    from kdjax.train.loop import RunInterrupted
    parallel.maybe_initialize_distributed()  # before anything touches a device
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        # SIGTERM and SIGUSR1 stop a standalone run between steps, as in a sweep (a handler already there stays:
        # submitit's in a SLURM job, an enclosing sweep's); Ctrl-C as Python's, never lost in a gc callback
        with stop_on_sigterm(signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT), only_unhandled=True):
            run(config.task, config, workdir)
    except RunInterrupted as e:
        ignore_abandoned_saves()
        fail(str(e))
        return 130
    except KeyboardInterrupt:
        # outside a training loop (setup, evaluation, a sweep between runs): checkpoints and finished runs stay
        ignore_abandoned_saves()
        fail(f"interrupted; what was saved before stays in {workdir}: run the same command to go on")
        return 130
    except USER_ERRORS as e:  # bad input: one line that names the fix, no traceback
        if debug:
            raise
        fail(str(e))
        return 1
    # Only a launch that ran describes the directory (training tasks record it when they claim the workdir).
    workdir_lib.write_config(workdir, config)
    return 0

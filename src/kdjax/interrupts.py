"""Stopping a run between steps on a signal: SIGTERM (scancel, a requeue, preemption, a scheduler stopping a shard),
SIGUSR1 (a scheduler's warning before a time limit), the way Ctrl-C does.

The handler raises ``KeyboardInterrupt`` where the main thread happens to be, as Python's own Ctrl-C handler does.
Where that is inside a callback whose exceptions Python only reports (the garbage collector's, e.g. jax's
``_xla_gc_callback``), the exception would be printed as "Exception ignored" and dropped, and the run would go on;
so the signal is also kept as pending, the training loop raises it at its next step boundary (``raise_if_pending``),
and the dropped one is not printed (it is not lost).

A leaf module: the training loop and the sweep's executors both use it.
"""
import contextlib
import signal
import sys
import threading
from typing import Callable, List

# Signals received whose interruption the training loop has not raised yet (the handler's own raise may have been
# swallowed). Cleared when the handlers are removed.
_pending: List[int] = []


def raise_if_pending() -> None:
    """Raise the pending interruption, once: called by the training loop between dispatches."""
    if _pending:
        signum = _pending.pop()
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_on_sigterm(ignore: Callable[[], bool] = lambda: False, signals=(signal.SIGTERM,),
                    only_unhandled: bool = False):
    """SIGTERM stops the run in this process the way Ctrl-C does: between steps, with its checkpoints closed and its
    workdir lock released, so that the next start resumes at once. (Python's default would end the process on the
    spot; submitit's ignores it until SIGKILL.) Once only: a second SIGTERM, or one while ``ignore()`` says the
    process is already on its way out, must not interrupt the closing of a checkpoint. Only in the main thread,
    where signal handlers live. ``signals`` may add others (SIGUSR1; SIGINT, which keeps Python's semantics of
    interrupting every time, and only gains the pending record); with ``only_unhandled`` a signal that already has
    a handler of its own (submitit's, an enclosing sweep's; Python's Ctrl-C handler does not count) keeps it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def interrupt(signum, frame):
        if signum != signal.SIGINT and (stopping or ignore()):
            return
        stopping.append(signum)
        _pending.append(signum)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def drop_swallowed_interrupt(unraisable):
        """Python's report of an exception it dropped: not for a pending interruption, which the loop raises."""
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _pending):
            previous_hook(unraisable)

    previous, previous_hook = {}, sys.unraisablehook
    for signum in signals:
        if only_unhandled and signal.getsignal(signum) not in (signal.SIG_DFL, None, signal.default_int_handler):
            continue
        previous[signum] = signal.signal(signum, interrupt)
    sys.unraisablehook = drop_swallowed_interrupt
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = previous_hook
        _pending.clear()

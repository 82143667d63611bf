"""kdjax.interrupts: a signal stops a run between steps even when its KeyboardInterrupt lands where Python only
reports exceptions (a garbage-collector callback, as jax's own)."""
import gc
import signal

import pytest

from kdjax import interrupts


def _signal_inside_a_gc_callback(signum):
    """Deliver ``signum`` while the garbage collector runs a callback: the handler's KeyboardInterrupt is raised
    there, and Python drops it (reporting it through sys.unraisablehook)."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            signal.raise_signal(signum)

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert fired


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_swallowed_in_a_gc_callback_is_raised_at_the_next_step_boundary(signum, capfd):
    with interrupts.stop_on_sigterm(signals=(signum,)):
        _signal_inside_a_gc_callback(signum)
        with pytest.raises(KeyboardInterrupt, match=f"signal {signum.name}"):
            interrupts.raise_if_pending()  # what the training loop calls between dispatches
        interrupts.raise_if_pending()  # once only
        if signum == signal.SIGTERM:  # a second SIGTERM no longer interrupts (a checkpoint may be closing)
            signal.raise_signal(signum)
        else:  # Ctrl-C keeps Python's semantics: every one interrupts
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signum)
    assert "Exception ignored" not in capfd.readouterr().err  # the dropped one was not lost, so not reported


def test_leaving_the_handlers_forgets_a_pending_signal():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.stop_on_sigterm():
            signal.raise_signal(signal.SIGTERM)
    interrupts.raise_if_pending()  # nothing pending once the handlers are gone
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


def test_only_unhandled_leaves_a_handler_of_its_own_but_takes_over_pythons_ctrl_c():
    def own(signum, frame):
        pass
    previous = signal.signal(signal.SIGUSR1, own)
    try:
        with interrupts.stop_on_sigterm(signals=(signal.SIGUSR1, signal.SIGINT), only_unhandled=True):
            assert signal.getsignal(signal.SIGUSR1) is own
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGUSR1, previous)

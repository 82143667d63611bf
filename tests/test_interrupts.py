"""kdjax.interrupts: a signal stops a run between steps even when its KeyboardInterrupt lands where Python only
reports exceptions (a garbage-collector callback, as jax's own)."""
import gc
import signal

import pytest

from kdjax import interrupts


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_a_signal_swallowed_in_a_gc_callback_is_raised_at_the_next_step_boundary():
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the callback

    with interrupts.stop_on_sigterm():
        gc.callbacks.append(callback)
        try:
            gc.collect()  # the handler's KeyboardInterrupt is raised in the callback: Python prints and drops it
        finally:
            gc.callbacks.remove(callback)
        assert fired
        with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
            interrupts.raise_if_pending()  # what the training loop calls between dispatches
        interrupts.raise_if_pending()  # once only
        signal.raise_signal(signal.SIGTERM)  # a second signal no longer interrupts (a checkpoint may be closing)
        interrupts.raise_if_pending()


def test_leaving_the_handlers_forgets_a_pending_signal():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.stop_on_sigterm():
            signal.raise_signal(signal.SIGTERM)
    interrupts.raise_if_pending()  # nothing pending once the handlers are gone
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)

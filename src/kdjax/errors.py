"""The one base class of every error that ends a kdjax command in one line (``error: ...``, no traceback).

Each error says what is wrong and names the fix. The command line catches ``KdjaxError`` (and the ``ValueError`` /
``FileNotFoundError`` of a library's argument checks); anything else is a bug and keeps its traceback. The
subclasses live beside the code that raises them and also derive from the built-in type a caller would expect
(``ConfigError`` is a ``ValueError``, ``WorkdirBusy`` a ``RuntimeError``), so ``except ValueError`` keeps working.
A leaf module: it imports nothing of kdjax.
"""


class KdjaxError(Exception):
    """Bad input or a state the user must act on; its message is one line naming the fix."""

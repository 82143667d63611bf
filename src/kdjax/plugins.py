"""``KDJAX_PLUGINS``: modules imported before a command or a SLURM job runs, so that the models, schemes, data
sources and distillers they register exist there (comma-separated module names on the PYTHONPATH)."""
import importlib
import os

from kdjax.errors import KdjaxError


class PluginError(KdjaxError, ValueError):
    """A module that KDJAX_PLUGINS names cannot be imported."""


def import_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get("KDJAX_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise PluginError(f"KDJAX_PLUGINS names {name!r}, which cannot be imported ({e}); fix the name or its "
                              f"PYTHONPATH") from None
        except Exception as e:  # the module's own code failed: one line naming it, not its traceback
            first = (str(e).splitlines() or [""])[0][:200]
            raise PluginError(f"KDJAX_PLUGINS module {name!r} raised {type(e).__name__} on import: {first}; fix the "
                              f"module (KDJAX_DEBUG=1 shows where)") from e

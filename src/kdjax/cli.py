"""kdjax's command line: ``kdjax <task> [--config.a.b=v ...] --workdir=DIR`` (also ``python -m kdjax`` and the
repository's ``launch.py``).

    kdjax teacher --config.model=resnet8 --config.dataset=digits --workdir=runs/t
    kdjax --config=my_config.py:model=resnet8 --config.epochs=2 --workdir=runs/t   # a config file of your own
    kdjax distill --help                                                           # every field, default, meaning

The task's defaults come from ``kdjax.configs.<task>``; ``--config=PATH.py[:k=v,...]`` takes a file's
``get_config(arg)`` instead (its ``task`` field names the task). ``--config.a.b=v`` then sets any field
(``kdjax.configs.parse``). The resolved config is written to ``DIR/config.json`` once the launch is accepted
(a refused launch leaves the directory as it was).

Every mistake in the command line or in the config is one line on stderr (``error: ...``), exit status 2; a run
that fails on bad input (a missing checkpoint, a dataset not prepared) is one line too, exit status 1.
``KDJAX_DEBUG=1`` shows the traceback instead; ``KDJAX_VERBOSE=1`` shows the libraries' INFO logs.
``KDJAX_PLUGINS=module[,module]`` imports modules first: a place to ``kdjax.models.register`` a model or
``kdjax.data.register_source`` a dataset of your own and use it by name.
"""
import dataclasses
import os
import sys
from typing import List, Optional

import ml_collections

from kdjax import plugins
from kdjax.errors import KdjaxError

USAGE = "usage: kdjax <task> [--config.FIELD=VALUE ...] --workdir=DIR   |   kdjax --config=FILE.py[:k=v,...] ..."


class UsageError(KdjaxError, ValueError):
    """The command line itself is wrong (exit status 2)."""


@dataclasses.dataclass
class Invocation:
    config: Optional[ml_collections.ConfigDict]
    workdir: Optional[str]
    help: bool
    task: Optional[str]


def _split(arg: str):
    if "=" not in arg:
        raise UsageError(f"{arg!r} needs a value: {arg}=VALUE")
    return arg.split("=", 1)


def parse_args(argv: List[str]) -> Invocation:
    """The config (task defaults or a file, then every ``--config.`` override), the workdir and ``--help``."""
    from kdjax import configs
    task, config_spec, overrides, workdir, want_help = None, None, [], None, False
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            want_help = True
        elif arg.startswith("--config."):
            overrides.append(_split(arg[len("--config."):]))
        elif arg.startswith("--config="):
            config_spec = arg[len("--config="):]
        elif arg == "--config":
            raise UsageError("write --config=FILE.py (with '='), or name a task: kdjax <task>")
        elif arg.startswith("--workdir="):
            workdir = arg[len("--workdir="):]
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg.split('=')[0]!r}: options are --config.FIELD=VALUE, "
                             f"--config=FILE.py, --workdir=DIR, --help")
        elif task is None:
            task = arg
        else:
            raise UsageError(f"unexpected argument {arg!r}; {USAGE}")
    if task is not None and task not in configs.TASKS:
        raise UsageError(f"unknown task {task!r}; tasks: {', '.join(configs.TASKS)}")
    if config_spec is None and task is None:
        return Invocation(None, workdir, True, None)
    config = configs.load(config_spec) if config_spec else configs.task_config(task)
    if task is not None and config_spec and config.task != task:
        raise UsageError(f"the config file is for task {config.task!r}, not {task!r}: drop one of the two")
    for path, text in overrides:
        configs.set_field(config, path, text)
    return Invocation(config, workdir, want_help, task or config.task)


def describe_tasks() -> str:
    from kdjax import configs
    width = max(map(len, configs.TASKS))
    lines = [USAGE, "", "tasks:"]
    lines += [f"  {name:<{width}}  {line}" for name, (line, _) in configs.TASKS.items()]
    lines += ["", "examples:"] + [f"  {example}" for _, example in configs.TASKS.values()][:4]
    lines += ["", "`kdjax <task> --help` lists the task's fields with their defaults and meaning."]
    return "\n".join(lines)


def describe_fields(config: ml_collections.ConfigDict, task: str) -> str:
    """Every field of ``config`` (dotted), its default and its help line."""
    from kdjax import configs
    from kdjax.configs import fields

    rows = []

    def walk(node, prefix):
        for key in node.keys():
            value, path = node[key], prefix + key
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, path + ".")
            else:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else ("unset" if value is None
                                                                                    else value)
                rows.append((path, str(shown), fields.help_for(path)))

    walk(config, "")
    width = min(max(len(p) for p, _, _ in rows), 34)
    line, example = configs.TASKS.get(task, ("", ""))
    out = [f"kdjax {task}: {line}", f"  e.g. {example}", "", "fields (--config.FIELD=VALUE; lists comma-separated):"]
    for path, default, text in rows:
        default = default if len(default) <= 40 else default[:37] + "..."
        out.append(f"  {path:<{width}}  = {default:<12}  {text}")
    return "\n".join(out)


def _fail(message: str, status: int):
    from kdjax import tasks
    tasks.fail(message)
    sys.exit(status)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    from kdjax.configs.parse import ConfigError
    debug = bool(os.environ.get("KDJAX_DEBUG"))
    try:
        plugins.import_plugins()
        inv = parse_args(argv)
    except (UsageError, ConfigError, plugins.PluginError) as e:
        if debug:
            raise
        _fail(str(e), 2)
    if inv.help or inv.config is None:
        print(describe_tasks() if inv.config is None else describe_fields(inv.config, inv.task))
        return
    if not inv.workdir:
        _fail(f"give the run's directory: --workdir=DIR ({USAGE})", 2)
    run(inv.config, inv.workdir, debug)


def run(config, workdir: str, debug: bool = False) -> None:
    """Run ``config``'s task in ``workdir``; bad input ends in one line (``kdjax.tasks.run_command``)."""
    from kdjax import tasks
    status = tasks.run_command(config, workdir, debug)
    if status:
        sys.exit(status)

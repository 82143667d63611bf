"""Name -> distiller class, filled where each class is defined (``@register``), and the options the classes
declare (``option``): the ``distill`` config block and its ``--help`` lines are derived from them, so the command
line, the README's table and the registry cannot drift apart.

A leaf module: it imports nothing of kdjax, so every distiller module can import it.
"""
import dataclasses
import typing
from typing import Any, Dict, List, Tuple

_REGISTRY: Dict[str, type] = {}

# The original train_student.py's --distill spellings of the methods kdjax names by their short names.
ALIASES = {"correlation": "cc", "abound": "ab", "factor": "ft", "attention": "at", "similarity": "sp"}

# Dataclass fields that are not ``distill.*`` options: the weight of a distiller's term is ``loss.beta``.
NOT_OPTIONS = ("beta",)


def register(cls: type) -> type:
    """Class decorator: register a ``Distiller`` subclass under its ``name`` (a user's too; re-registering a
    name replaces it)."""
    _REGISTRY[cls.name] = cls
    return cls


def option(default: Any, help: str):  # noqa: A002  (the word the --help lines use)
    """A distiller option: a dataclass field with its one line of help (``kdjax distill --help`` shows it as
    ``distill.<field>``, prefixed with the distillers that have it and their defaults)."""
    return dataclasses.field(default=default, metadata={"help": help})


def get(name: str) -> type:
    return _REGISTRY[name]


def names() -> List[str]:
    """The canonical names (aliases excluded)."""
    return sorted(_REGISTRY)


def canonical(name: str) -> str:
    """``name`` with an alias of the original code resolved; an unknown name fails with the valid ones."""
    check_name(name)
    return ALIASES.get(name, name)


def check_name(name: str) -> None:
    if ALIASES.get(name, name) not in _REGISTRY:
        known = [f"{a} ({c})" for a, c in sorted(ALIASES.items()) if c in _REGISTRY]
        if name in ALIASES:
            raise ValueError(f"distiller {name!r} (the original's spelling of {ALIASES[name]!r}) is not built in "
                             f"kdjax yet; valid distillers: {', '.join(names())}")
        raise ValueError(f"unknown distiller {name!r}; valid distillers: {', '.join(names())}; aliases: "
                         f"{', '.join(known)}")


def create(name: str, **options):
    """The distiller ``name`` (or an alias of it) with its dataclass fields replaced by ``options`` (None values
    are ignored, so a config can pass ``beta=None`` to mean "the method's default")."""
    cls = _REGISTRY[canonical(name)]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for distiller {cls.name!r}; "
                         f"valid options: {', '.join(valid)}")
    return cls(**{k: v for k, v in options.items() if v is not None})


def _value_type(cls: type, field: dataclasses.Field) -> type:
    """The field's type, ``Optional[X]`` read as ``X`` (a placeholder is None until set)."""
    hint = typing.get_type_hints(cls).get(field.name, type(field.default))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    type: type
    help: str
    defaults: Tuple[Tuple[str, Any], ...]   # (distiller, default) of every registered distiller that has it

    def help_line(self, all_names: List[str]) -> str:
        owners = [d for d, _ in self.defaults]
        who = "every distiller" if owners == all_names else " / ".join(owners)
        values = {repr(v) for _, v in self.defaults}
        if len(values) == 1:
            default = self.defaults[0][1]
            shown = "" if default is None else f" ({default})"
        else:
            shown = " (" + ", ".join(f"{d} {v}" for d, v in self.defaults) + ")"
        return f"{who}: {self.help}{shown}"


def options() -> Dict[str, Option]:
    """Every ``distill.*`` option of the registered distillers, in the order of the registry's names and their
    fields; one option per field name, shared by the distillers that declare it."""
    found: Dict[str, dict] = {}
    for name in names():
        cls = _REGISTRY[name]
        for field in dataclasses.fields(cls):
            if field.name in NOT_OPTIONS:
                continue
            help_text = field.metadata.get("help")
            if not help_text:
                raise TypeError(f"distiller {name!r}: field {field.name!r} has no help; declare it with "
                                f"registry.option(default, help)")
            entry = found.setdefault(field.name, {"type": _value_type(cls, field), "help": help_text,
                                                  "defaults": []})
            entry["defaults"].append((name, field.default))
    return {k: Option(k, v["type"], v["help"], tuple(v["defaults"])) for k, v in found.items()}


def option_help(field: str) -> str:
    """The ``--help`` line of ``distill.<field>`` ('' for a field no distiller declares)."""
    table = options()
    return table[field].help_line(names()) if field in table else ""


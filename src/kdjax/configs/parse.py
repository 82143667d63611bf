"""Setting config fields from text: ``--config.a.b=v`` on the command line and the ``k=v,k=v`` argument after the
colon of ``--config=FILE.py:...``, with one rule for both.

A value is converted to the type of the field it replaces (placeholders keep theirs): booleans accept
true/false/1/0/yes/no, tuples are comma-separated (``--config.seeds=0,1,2``; inside the colon argument, where the
comma separates fields, items are joined with ``+``), ``none`` unsets a placeholder. Every mistake is a
``ConfigError`` of one line that names the fix; a mistyped field name gets a did-you-mean.
"""
import ast
import difflib
from typing import Any, List

import ml_collections
from kdjax.errors import KdjaxError


class ConfigError(KdjaxError, ValueError):
    """A config field or value the user gave cannot be used."""


def _dotted_names(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
    names = []
    for key in config.keys():
        value = config[key]
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names += _dotted_names(value, prefix + key + ".")
    return names


# The spellings other tools use for kdjax's field names (the last component of a dotted name).
SYNONYMS = {"learning_rate": "lr", "base_lr": "lr", "wd": "weight_decay", "weight_decay_rate": "weight_decay",
            "num_epochs": "epochs", "n_epochs": "epochs", "bs": "batch_size", "batch": "batch_size",
            "temp": "temperature", "T": "temperature", "augmentation": "aug", "model_dir": "workdir",
            "lr_decay_epochs": "decay_epochs", "milestones": "decay_epochs", "lr_decay_rate": "decay_rate",
            "gamma_decay": "decay_rate", "data": "dataset", "random_seed": "seed"}


def suggestion(path: str, names: List[str]) -> str:
    """The known field a mistyped ``path`` most likely means, or '': another tool's word for a field of the same
    group (``optim.learning_rate`` -> ``optim.lr``), else a close spelling of the whole name, else a close spelling
    of its last part within its group."""
    group, _, leaf = path.rpartition(".")
    prefix = group + "." if group else ""
    synonym = prefix + SYNONYMS.get(leaf, "")
    if leaf in SYNONYMS and synonym in names:
        return synonym
    close = difflib.get_close_matches(path, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    siblings = [n[len(prefix):] for n in names if n.startswith(prefix) and "." not in n[len(prefix):]]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    return prefix + close[0] if close else ""


def _unknown_field(config, path: str) -> ConfigError:
    close = suggestion(path, _dotted_names(config))
    hint = f"did you mean {close!r}? " if close else ""
    top = sorted(k for k in config.keys())
    return ConfigError(f"unknown config field {path!r}; {hint}fields: {', '.join(top)} (`--help` lists them all)")


def _scalar(text: str, field_type, path: str) -> Any:
    text = text.strip()
    try:
        if field_type is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if field_type is int:
            return int(text)
        if field_type is float:
            return float(text)
        if field_type is str:
            return text
    except ValueError:
        raise ConfigError(f"{path}={text!r}: expected {'a boolean' if field_type is bool else field_type.__name__}"
                          ) from None
    try:  # fields of another type (rare): a Python literal, else the text itself
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_value(text: str, current: Any, field_type, path: str, list_sep: str = ",") -> Any:
    """``text`` as a value for a field holding ``current`` (of ``field_type``)."""
    if field_type is not str and text.strip().lower() == "none":
        return None
    if isinstance(current, (tuple, list)) or field_type in (tuple, list):
        stripped = text.strip()
        if stripped[:1] in "([" and stripped[-1:] in ")]":
            stripped = stripped[1:-1]
        items = [item for item in (s.strip() for s in stripped.replace(list_sep, ",").split(",")) if item]
        item_type = type(current[0]) if current else None
        return tuple(_scalar(item, item_type, path) for item in items)
    return _scalar(text, field_type, path)


def set_field(config: ml_collections.ConfigDict, path: str, text: str, list_sep: str = ",") -> None:
    """Set the dotted field ``path`` of ``config`` from ``text`` (module docstring)."""
    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_field(config, path)
        if i < len(parts) - 1:
            node = node[part]
    key = parts[-1]
    current = node[key]
    if isinstance(current, ml_collections.ConfigDict):
        example = next(iter(current.keys()), "name")
        raise ConfigError(f"{path} is a group of fields: set them one by one, e.g. --config.{path}.{example}=... "
                          f"(fields: {', '.join(current.keys())})")
    value = parse_value(text, current, node.get_type(key), path, list_sep)
    try:
        with node.unlocked():
            node[key] = value
    except TypeError:
        raise ConfigError(f"{path}={text!r}: expected a value of type {node.get_type(key).__name__}") from None


def apply_arg(config: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
    """Fill top-level fields from the colon argument ``"model=resnet56,seeds=0+1+2"``; returns ``config``."""
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not of the form field=value (fields separated by ',', "
                              f"list items by '+')")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in config:
            raise _unknown_field(config, key)
        set_field(config, key, text, list_sep="+")
    return config

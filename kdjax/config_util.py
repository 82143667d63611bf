"""Helpers for ``configs/*.py``: the ``k=v,k=v`` argument after the colon fills top-level config fields."""
import ast
from typing import Any

import ml_collections


def _parse_value(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, str) or default is None:
        return text
    return ast.literal_eval(text)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """ConfigDict of ``defaults`` with the fields named in ``arg`` ("model=resnet56,dataset=cifar100") replaced.

    An unknown field fails with the list of known ones, so a typo never goes unnoticed.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} is not of the form key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in values:
            raise ValueError(f"unknown config field {key!r}; fields: {', '.join(sorted(values))}")
        values[key] = _parse_value(text, values[key])
    return ml_collections.ConfigDict(values)

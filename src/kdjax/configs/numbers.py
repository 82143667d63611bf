"""The numeric fields of a run checked for sense before anything loads or compiles: a value outside its range
(a negative learning rate, a zero temperature, an empty test set, a seed no key can hold, an image size no
accelerator holds) is one line naming the field and its valid range, instead of a silent nonsense run or a
traceback later."""
import math
from typing import Optional

# Far above any dataset kdjax knows (ImageNet is trained at 224): larger sizes only exhaust memory later.
MAX_IMAGE_SIZE = 1024
SEED_RANGE = (0, 2 ** 63 - 1)  # what jax.random.key takes


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}: set --config.{name}=NUMBER")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}: set --config.{name}=NUMBER")
    return value


def _check(name: str, value, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           integer: bool = False, meaning: str = "") -> None:
    if value is None:
        return  # unset: the default applies
    value = _number(name, value)
    if integer and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}: set --config.{name}=N")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        bounds = (f"> {low:g}" if low_open else f">= {low:g}") if low is not None else ""
        if high is not None:
            bounds = f"{bounds} and <= {high:g}" if bounds else f"<= {high:g}"
        raise ValueError(f"{name} must be {bounds}, got {value:g}{meaning}: set --config.{name} within that range")


def check_numbers(config) -> None:
    """Every numeric field ``config`` has, checked against its range (unset fields are skipped)."""
    _check("optim.lr", _get(config, "optim.lr"), low=0, low_open=True, meaning=" (a learning rate)")
    _check("optim.momentum", _get(config, "optim.momentum"), low=0, high=1)
    _check("optim.weight_decay", _get(config, "optim.weight_decay"), low=0)
    _check("optim.decay_rate", _get(config, "optim.decay_rate"), low=0, low_open=True)
    _check("loss.temperature", _get(config, "loss.temperature"), low=0, low_open=True,
           meaning=" (KD divides the logits by it)")
    for weight in ("gamma", "alpha", "beta"):
        _check(f"loss.{weight}", _get(config, f"loss.{weight}"), low=0)
    for count in ("num_train", "num_test", "num_classes"):
        _check(f"dataset_options.{count}", _get(config, f"dataset_options.{count}"), low=1, integer=True)
    _check("seed", _get(config, "seed"), low=SEED_RANGE[0], high=SEED_RANGE[1], integer=True)
    _check("image_size", _get(config, "image_size"), low=1, high=MAX_IMAGE_SIZE, integer=True)

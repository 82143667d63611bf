"""Name -> constructor registry of the model zoo. Users add their own with ``register``."""
from typing import Callable, Dict

import jax.numpy as jnp

# constructor(num_classes, image_size, dtype) -> flax.linen.Module
_CONSTRUCTORS: Dict[str, Callable] = {}


def register(name: str, constructor: Callable = None):
    """Register ``constructor(num_classes, image_size, dtype) -> nn.Module`` under ``name``.

    Usable as a call or as a decorator; re-registering a name replaces it.
    """
    if constructor is None:
        return lambda fn: register(name, fn)
    _CONSTRUCTORS[name] = constructor
    return constructor


def names():
    return sorted(_CONSTRUCTORS)


def check_name(name: str) -> None:
    if name not in _CONSTRUCTORS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")


def create(name: str, num_classes: int, image_size: int = 32, dtype=jnp.float32):
    """A flax.linen Module; ``apply(variables, images_nhwc, train=False, features=False)`` gives logits, or
    ``(features, logits)`` with ``features=True``."""
    check_name(name)
    return _CONSTRUCTORS[name](num_classes=num_classes, image_size=image_size, dtype=dtype)

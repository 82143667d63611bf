"""Name -> constructor registry of the model zoo. Users add their own with ``register``.

Also the feature-module mask of a model (``feature_mask``): which top-level modules are the original's
``get_feat_modules()``, what the two-stage distillers (AB, FSP) train in their init stage. A model class declares
the others in a class attribute ``non_feature_modules`` (top-level flax names); one that declares nothing has only
its classifier ``fc`` outside.
"""
from typing import Callable, Dict, Tuple

import jax
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
    """A flax.linen Module; ``apply(variables, images_nhwc, train=False, features=False, preact=False)`` gives
    logits, or ``(features, logits)`` with ``features=True`` (``preact=True``: the original's pre-activation
    features; zoo models only, a user-registered model may lack the keyword)."""
    check_name(name)
    return _CONSTRUCTORS[name](num_classes=num_classes, image_size=image_size, dtype=dtype)


def feature_shapes(model, variables, batch: int, image_size: int, preact: bool = False):
    """The shapes (``jax.ShapeDtypeStruct``s) of ``model.apply(..., features=True)``'s feature list for a batch,
    without computing anything: what a distiller sizes its heads and state from."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    asked = {"preact": True} if preact else {}  # only when asked: a user-registered model may lack the keyword
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False, features=True, **asked)[0], variables, x)


def abstract_feature_shapes(name: str, num_classes: int, image_size: int, batch: int, preact: bool = False):
    """The feature shapes of a freshly initialised model ``name``, without computing anything (start-up checks
    before any checkpoint or data is loaded)."""
    model = create(name, num_classes, image_size, jnp.float32)
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return feature_shapes(model, variables, batch, image_size, preact)


# The non-feature modules of a model class that declares none: its classifier, under the zoo's most common name.
DEFAULT_NON_FEATURE_MODULES = ("fc",)


def non_feature_modules(name: str) -> Tuple[str, ...]:
    """Top-level module names of model ``name`` outside the original's ``get_feat_modules()`` (the classifier, and
    for some families the layers between the last feature and it): the model's ``non_feature_modules`` attribute,
    or ``DEFAULT_NON_FEATURE_MODULES``."""
    module = create(name, num_classes=10)  # construction only, no init: cheap
    return tuple(getattr(module, "non_feature_modules", DEFAULT_NON_FEATURE_MODULES))


def feature_mask(name: str, tree):
    """A pytree of bools with the structure of ``tree``, the ``params`` or ``batch_stats`` of model ``name``: True
    for the leaves under the original's feature modules, False for those under ``non_feature_modules(name)``."""
    excluded = non_feature_modules(name)
    # A params tree without any of the declared names is not this model's params (a full variables dict, or a
    # model whose classifier is not named as declared): a mask of all True would silently train the classifier.
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    holds_kernels = any(getattr(path[-1], "key", None) == "kernel" for path, _ in leaves)
    if holds_kernels and not set(excluded) & set(tree):
        raise ValueError(f"feature_mask({name!r}): none of the non-feature modules {list(excluded)} is among the "
                         f"top-level names {sorted(tree)}; pass the 'params' (or 'batch_stats') tree, or declare "
                         f"'non_feature_modules' on the model class")
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key not in excluded, tree)

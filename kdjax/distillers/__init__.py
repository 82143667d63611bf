"""Feature distillers beside KD: ``kd`` (nothing extra), ``crd``, ``hint``, ``at``, ``sp``, ``pkt``, ``rkd``, ``vid``.

``create(name, **options)`` returns a ``Distiller`` (see ``kdjax.distillers.base`` for the interface);
``names()`` lists the registered names. Wiring into a KD step::

    d = distillers.create(config.distiller)                      # options: beta=, with_kd=, nce_k=, hint_layer=...
    w = distillers.resolve_weights(d, config.aug)                # {'gamma', 'alpha', 'beta'}
    shapes_s = jax.eval_shape(lambda x: student.apply(vars_s, x, features=True)[0], x)  # and shapes_t
    d_params, d_state = d.init(key, shapes_s, shapes_t, num_train=N, train_labels=train_labels)
    # in the step, on the original batch only:
    extra, d_state = d.loss(d_params, d_state, feats_s, feats_t, labels=y, indices=idx, key=k)
    total = w['gamma'] * ce + w['alpha'] * kl_block + w['beta'] * extra
"""
import dataclasses
from typing import Dict, Type

from kdjax.distillers.base import Distiller, resolve_weights  # noqa: F401
from kdjax.distillers.crd import CRD
from kdjax.distillers.feature import AT, PKT, RKD, SP, VID, Hint

_REGISTRY: Dict[str, Type[Distiller]] = {}


def register(cls: Type[Distiller]) -> Type[Distiller]:
    """Register a ``Distiller`` subclass under its ``name`` (usable as a class decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (Distiller, CRD, Hint, AT, SP, PKT, RKD, VID):
    register(_cls)


def names():
    return sorted(_REGISTRY)


def check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown distiller {name!r}; valid distillers: {', '.join(names())}")


def create(name: str, **options) -> Distiller:
    """The distiller ``name`` with its dataclass fields replaced by ``options`` (None values are ignored, so a
    config can pass ``beta=None`` to mean "the method's default")."""
    check_name(name)
    cls = _REGISTRY[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for distiller {name!r}; "
                         f"valid options: {', '.join(valid)}")
    return cls(**{k: v for k, v in options.items() if v is not None})

"""Feature distillers beside KD: ``kd`` (nothing extra), ``crd``, ``hint``, ``at``, ``sp``, ``pkt``, ``rkd``, ``vid``.

``create(name, **options)`` returns a ``Distiller`` (see ``kdjax.distillers.interface`` for the interface);
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

import optax

from kdjax.distillers.interface import Distiller, resolve_weights  # noqa: F401
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


# fold_in constant of the distiller's key: derived apart from the (base, scheme) split so that adding a distiller
# leaves the KD randomness of a run unchanged.
DISTILLER_KEY = 0x6469


def is_active(distiller) -> bool:
    """True when ``distiller`` adds a loss term (anything but ``None`` and ``kd``)."""
    return distiller is not None and distiller.name != "kd"


def make_extra(distiller, tx, key, feats_s, feats_t, num_train=None, train_labels=None):
    """``state['extra']`` of a run with ``distiller``: its heads, their optimiser state and its non-trainable state.

    ``feats_s``/``feats_t``: the feature lists (arrays or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``)
    of ``model.apply(..., features=True)``. ``{}`` for ``kd`` (or no distiller), so a KD state is unchanged."""
    if not is_active(distiller):
        return {}
    heads, d_state = distiller.init(key, feats_s, feats_t, num_train=num_train, train_labels=train_labels)
    return {"params": heads, "opt_state": tx.init(heads), "state": d_state}


def update_heads(tx, extra, head_grads, d_state):
    """The heads' optax update (the student's transformation, their own optimiser state) and the new state."""
    updates, opt_state = tx.update(head_grads, extra["opt_state"], extra["params"])
    return dict(extra, params=optax.apply_updates(extra["params"], updates), opt_state=opt_state, state=d_state)

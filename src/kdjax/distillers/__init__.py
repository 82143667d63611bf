"""The distillers of the KD step: ``kd`` (plain KD), the feature distillers beside KD (``crd``, ``hint``, ``at``,
``sp``, ``pkt``, ``rkd``, ``vid``, ``nst``, ``kdsvd``, ``cc``, ``reviewkd``), the logit distillers that replace KD's KL terms
(``dkd``, ``dist``, ``nkd``, ``wttm``) and the original's two-stage methods (``ab``, ``ft``, ``fsp``), which train
an init stage before the KD stage.

``create(name, **options)`` returns a ``Distiller`` (see ``kdjax.distillers.interface`` for the interface);
``names()`` lists the registered names; the original code's ``--distill`` spellings (``correlation``, ``attention``,
``abound``, ``factor``, ...) are accepted as aliases and give the canonical distiller. Wiring into a KD step::

    d = distillers.create(config.distiller)                      # options: beta=, with_kd=, nce_k=, hint_layer=...
    w = distillers.resolve_weights(d, config.aug)                # {'gamma', 'alpha', 'beta'}
    shapes_s = jax.eval_shape(lambda x: student.apply(vars_s, x, features=True)[0], x)  # and shapes_t
    d_params, d_state = d.init(key, shapes_s, shapes_t, num_train=N, train_labels=train_labels)
    # each logit pair (x, and x' weighted by lw_mix): KL_T for kd and the feature distillers, the loss of a logit one
    logit_x = d.logit_loss(ls, lt, y, epoch, T)
    # a feature distiller's term, on the original batch only:
    extra, d_state = d.loss(d_params, d_state, feats_s, feats_t, labels=y, indices=idx, key=k)
    total = w['gamma'] * ce + w['alpha'] * (lw1 * logit_x + lw3 * logit_x_aug) + w['beta'] * extra

The two-stage methods (``d.init_stage``; ``init_stage_names()``) first minimise ``d.init_stage_loss(heads,
feats_s, feats_t)`` over ``heads = d.init_stage_heads(key, shapes_s, shapes_t)`` (and the student's feature
modules when ``d.init_trains_student``) for ``d.init_epochs`` epochs at ``d.init_stage_lr(student, lr)``, with
features asked with ``preact=d.preact``; ``make_extra(..., init_heads=heads)`` then hands the trained heads to the
KD stage (FT's paraphraser). ``ab`` and ``fsp`` have no KD-stage term (``d.stage_term`` False,
``has_feature_term`` False): their KD stage is plain KD.
"""
import optax

from kdjax.distillers.interface import (LOGIT_STAND_DISTILLERS, LS_TEMPERATURE, LS_WEIGHT,  # noqa: F401
                                        Distiller, resolve_weights)
from kdjax.distillers.registry import (ALIASES, canonical, check_name, create, names, option,  # noqa: F401
                                       option_help, options, register)
# the method modules register their classes as they are defined
from kdjax.distillers import crd, feature, logit, relational, review, two_stage  # noqa: F401,E402
from kdjax.distillers.logit import standardize  # noqa: F401,E402
from kdjax.distillers.registry import get as _get  # noqa: E402


def feature_names():
    """The distillers with a feature term beside KD in the KD step (ft included; ab and fsp, whose KD stage is plain
    KD, are not)."""
    return [n for n in names() if n != "kd" and not _get(n).replaces_kl and _get(n).stage_term]


def init_stage_names():
    """The two-stage distillers, which train an init stage before the KD stage."""
    return [n for n in names() if _get(n).init_stage]


def logit_names():
    """The distillers that replace KD's KL terms."""
    return [n for n in names() if _get(n).replaces_kl]


def check_logit_stand(distiller) -> None:
    """Logit standardisation applies to the losses the official code standardises: kd's KL and dkd."""
    name = "kd" if distiller is None else distiller.name
    if name not in LOGIT_STAND_DISTILLERS:
        raise ValueError(f"loss.logit_stand standardises the logits of {' and '.join(LOGIT_STAND_DISTILLERS)}, "
                         f"not distiller={name}: unset loss.logit_stand or use distiller=kd or dkd")


# fold_in constant of the distiller's key: derived apart from the (base, scheme) split so that adding a distiller
# leaves the KD randomness of a run unchanged.
DISTILLER_KEY = 0x6469


def has_feature_term(distiller) -> bool:
    """True when ``distiller`` adds a feature term (and heads/state) beside KD in the KD step: not ``None``,
    ``kd``, a logit distiller, or a two-stage method without a KD-stage term (``ab``, ``fsp``: their KD step is
    exactly plain KD's)."""
    return (distiller is not None and distiller.name != "kd" and not distiller.replaces_kl
            and bool(getattr(distiller, "stage_term", True)))


def make_extra(distiller, tx, key, feats_s, feats_t, num_train=None, train_labels=None, init_heads=None):
    """``state['extra']`` of a run with ``distiller``: its heads, their optimiser state and its non-trainable state.

    ``feats_s``/``feats_t``: the feature lists (arrays or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``)
    of ``model.apply(..., features=True)``. ``{}`` for ``kd``, a logit distiller (or no distiller), and ``ab`` and
    ``fsp``, so a KD state is unchanged. ``init_heads``: the heads trained by a two-stage distiller's init stage
    (FT's paraphraser), passed on to its ``init``; None when no init stage ran."""
    if not has_feature_term(distiller):
        return {}
    if distiller.init_stage:
        heads, d_state = distiller.init(key, feats_s, feats_t, num_train=num_train, train_labels=train_labels,
                                        init_heads=init_heads)
    elif init_heads is not None:
        raise ValueError(f"distiller {distiller.name!r} has no init stage, so no init_heads to take")
    else:
        heads, d_state = distiller.init(key, feats_s, feats_t, num_train=num_train, train_labels=train_labels)
    return {"params": heads, "opt_state": tx.init(heads), "state": d_state}


def update_heads(tx, extra, head_grads, d_state):
    """The heads' optax update (the student's transformation, their own optimiser state) and the new state."""
    updates, opt_state = tx.update(head_grads, extra["opt_state"], extra["params"])
    return dict(extra, params=optax.apply_updates(extra["params"], updates), opt_state=opt_state, state=d_state)

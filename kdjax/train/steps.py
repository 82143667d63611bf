"""Pure train-step factories. A step maps ``(state, teacher_vars, images_uint8, labels, key, indices)`` to
``(state, metrics)``; ``indices`` are the batch's dataset indices (CRD's memory banks need them; the other steps
ignore them). Everything static (models, optimiser, scheme, loss weights, distiller) is closed over, so one compile
serves a whole run and ``lax.scan`` can run many steps per dispatch.

``state`` is a dict pytree: ``params`` and ``batch_stats`` (the student's own variables, exactly what evaluation and
a later ``load_model`` need), ``opt_state``, ``step`` (int32) and ``extra``. ``extra`` is ``{}`` for plain KD; with a
feature distiller it is ``make_distiller_extra``'s ``{'params': heads, 'opt_state': ..., 'state': ...}``: the heads
(CRD's embeddings, FitNet's regressor, ...) are differentiated together with the student in one backward pass and
updated by the same optax transformation (so with the same learning rate and weight decay, as the original's single
SGD over student + heads); they keep an optimiser state of their own, which keeps ``params``/``opt_state`` the
student's alone. The distiller's non-trainable state (memory banks, a head's BatchNorm statistics) is
``extra['state']``. The whole ``state`` is what ``loop.fit`` checkpoints, so heads and banks resume exactly.
"""
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from kdjax import losses
from kdjax.augment import base as base_transform


@dataclasses.dataclass(frozen=True)
class KDWeights:
    """Loss = gamma*CE(s(x), y) + alpha*(lw1*KL(s(x), t(x)) + lw3*KL(s(x'), t(x'))) [+ lw2*mixed CE on x']."""
    gamma: float = 0.1
    alpha: float = 0.9
    beta: float = 0.0
    temperature: float = 4.0
    lw_mix: tuple = (1.0, 0.0, 1.0)


def make_prepare(mean, std, pad: int):
    """uint8 batch -> per-sample random crop (zero padding) + flip -> normalised float32 (the original's loader)."""
    def prepare(key, images_uint8):
        return base_transform.normalize(base_transform.base_train_transform(key, images_uint8, pad), mean, std)
    return prepare


def _apply_update(tx, state, grads, batch_stats, extra=None):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = dict(state, params=optax.apply_updates(state["params"], updates), batch_stats=batch_stats,
               opt_state=opt_state, step=state["step"] + 1)
    if extra is not None:
        new["extra"] = extra
    return new


def _top1(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def make_ce_step(model, tx, prepare: Callable):
    """Teacher training (and CE-only baselines without a scheme): cross-entropy on the base-augmented batch."""
    def step(state, teacher_vars, images_uint8, labels, key, indices=None):
        del teacher_vars, indices
        x = prepare(key, images_uint8)

        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
            loss = losses.cross_entropy(logits, labels)
            return loss, (upd["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new_state = _apply_update(tx, state, grads, batch_stats)
        return new_state, {"loss": loss, "ce": loss, "top1": _top1(logits, labels)}
    return step


def mixed_targets(aux: dict, labels, num_classes: int, rows: int):
    """Soft targets [rows, C] of the augmented batch: the scheme's label mixing (one-hot for label-preserving schemes)."""
    if "targets" in aux:
        return aux["targets"]
    onehot = jax.nn.one_hot(labels, num_classes)
    if "lam" in aux and "perm" in aux:
        lam = jnp.asarray(aux["lam"], jnp.float32)
        lam = lam.reshape(lam.shape + (1,) * (2 - lam.ndim)) if lam.ndim else lam
        return lam * onehot + (1.0 - lam) * onehot[aux["perm"]]
    if rows != labels.shape[0] or "picked" in aux:
        raise ValueError("the scheme picks or mixes images but gives no label targets (aux['targets']): create it "
                         "with dataset_stats that carry num_classes")
    return onehot


# fold_in constant of the distiller's key: derived apart from the (base, scheme) split so that adding a distiller
# leaves the KD randomness of a run unchanged.
DISTILLER_KEY = 0x6469


def make_distiller_extra(distiller, tx, key, feats_s, feats_t, num_train=None, train_labels=None):
    """``state['extra']`` of a run with ``distiller``: its heads, their optimiser state and its non-trainable state.

    ``feats_s``/``feats_t``: the feature lists (arrays or ``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``)
    of ``model.apply(..., features=True)``. ``{}`` for ``kd`` (or no distiller), so a KD state is unchanged."""
    if not is_active(distiller):
        return {}
    heads, d_state = distiller.init(key, feats_s, feats_t, num_train=num_train, train_labels=train_labels)
    return {"params": heads, "opt_state": tx.init(heads), "state": d_state}


def is_active(distiller) -> bool:
    """True when ``distiller`` adds a loss term (anything but ``None`` and ``kd``)."""
    return distiller is not None and distiller.name != "kd"


def _update_heads(tx, extra, head_grads, d_state):
    updates, opt_state = tx.update(head_grads, extra["opt_state"], extra["params"])
    return dict(extra, params=optax.apply_updates(extra["params"], updates), opt_state=opt_state, state=d_state)


def make_kd_step(student, teacher: Optional[Any], tx, prepare: Callable, augment: Callable, weights: KDWeights,
                 num_classes: int, scorer: Optional[str] = None, criterion: str = "entropy", distiller=None):
    """The paper's KD step (SPEC section 3) with scheme ``augment``; ``teacher=None`` trains with labels only.

    Forward passes: teacher (inference BN, no gradient) once on concat[x, x']; student once on concat[x, x'] with
    per-half BatchNorm statistics (``bn_groups=2``), which equals the original's two train-mode passes, running
    statistics updated for x then x'. CutMixPick by student entropy keeps the original's exact order instead:
    s(x), then the no-gradient train-mode scoring pass over the pool, then s(x').

    ``distiller`` (a ``kdjax.distillers.Distiller``; ``None`` or ``kd``: plain KD, the exact same program as
    without it) adds ``weights.beta * L(feats_s, feats_t)`` on the original batch x: the feature lists come from
    the same passes, asked for ``features=True`` (first half of the concatenated batch), so no pass is added. Its
    heads and state live in ``state['extra']`` (see ``make_distiller_extra``); the teacher stays a constant, so
    gradients reach the student and the heads only.
    """
    two_halves = student.clone(bn_groups=2)
    T = weights.temperature
    lw1, lw2, lw3 = (float(w) for w in weights.lw_mix)
    distill = is_active(distiller)
    want_features = distill and distiller.uses_features
    if distill and teacher is None:
        raise ValueError(f"distiller={distiller.name} distils the teacher's features and needs a teacher: set "
                         "teacher= and --config.teacher_checkpoint, or use distiller=kd")

    def teacher_logits(teacher_vars, x):
        return jax.lax.stop_gradient(teacher.apply(teacher_vars, x, train=False).astype(jnp.float32))

    def teacher_forward(teacher_vars, x):
        """(features or None, float32 logits), both constants."""
        if not want_features:
            return None, teacher_logits(teacher_vars, x)
        feats, logits = teacher.apply(teacher_vars, x, train=False, features=True)
        return jax.lax.stop_gradient(feats), jax.lax.stop_gradient(logits.astype(jnp.float32))

    def student_forward(module, variables, x):
        """Train-mode pass: (features or None, logits, BatchNorm updates); features only when the distiller
        uses them, so the KD program is the one without features."""
        if want_features:
            (feats, logits), upd = module.apply(variables, x, train=True, features=True, mutable=["batch_stats"])
            return feats, logits, upd
        logits, upd = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return None, logits, upd

    def first_rows(feats, rows):
        return None if feats is None else [f[:rows] for f in feats]

    def combine(ls, lsa, lt, lta, labels, aux):
        ce = losses.cross_entropy(ls, labels)
        metrics = {"ce": ce, "top1": _top1(ls, labels)}
        if teacher is None:  # labels only: CE on x and on x' (the scheme's mixed labels)
            soft = mixed_targets(aux, labels, num_classes, lsa.shape[0])
            ce_aug = jnp.mean(optax.softmax_cross_entropy(lsa, soft))
            metrics["ce_aug"] = ce_aug
            return lw1 * ce + lw3 * ce_aug, metrics
        kl = losses.kd_kl(ls, lt, T)
        kl_aug = losses.kd_kl(lsa, lta, T)
        loss = weights.gamma * ce + weights.alpha * (lw1 * kl + lw3 * kl_aug)
        if lw2:
            soft = mixed_targets(aux, labels, num_classes, lsa.shape[0])
            loss = loss + weights.alpha * lw2 * jnp.mean(optax.softmax_cross_entropy(lsa, soft))
        metrics.update(kl=kl, kl_aug=kl_aug)
        return loss, metrics

    def add_distiller(loss, metrics, heads, d_state, feats_s, feats_t, labels, indices, key):
        """loss + beta * L(f_s(x), f_t(x)); returns the distiller's new state (unchanged for plain KD)."""
        if not distill:
            return loss, metrics, d_state
        term, d_state = distiller.loss(heads, d_state, feats_s, feats_t, labels=labels, indices=indices,
                                       key=jax.random.fold_in(key, DISTILLER_KEY), train=True)
        metrics["distill"] = term
        return loss + weights.beta * term, metrics, d_state

    def score_by_teacher(teacher_vars):
        def score_fn(pool):
            return losses.entropy(teacher_logits(teacher_vars, pool)), None
        return score_fn

    def step(state, teacher_vars, images_uint8, labels, key, indices=None):
        if distill and distiller.needs_indices and indices is None:
            raise ValueError(f"distiller={distiller.name} needs the batch's dataset indices: call "
                             "step(state, teacher_vars, images, labels, key, indices)")
        k_base, k_aug = jax.random.split(key)
        x = prepare(k_base, images_uint8)
        batch = x.shape[0]
        extra = state["extra"]
        heads, d_state = (extra["params"], extra["state"]) if distill else ({}, {})

        if scorer == "student":
            def loss_fn(params, heads):
                variables = {"params": params, "batch_stats": state["batch_stats"]}
                fs, ls, upd = student_forward(student, variables, x)
                frozen = jax.lax.stop_gradient(params)

                def score_fn(pool):
                    logits, pool_upd = student.apply({"params": frozen, "batch_stats": upd["batch_stats"]}, pool,
                                                     train=True, mutable=["batch_stats"])
                    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
                    if criterion == "kld":
                        scores = losses.kd_kl_per_sample(logits, teacher_logits(teacher_vars, pool), T)
                    else:
                        scores = losses.entropy(logits)
                    return scores, pool_upd["batch_stats"]

                x_aug, aux = augment(k_aug, x, labels, score_fn)
                x_aug = jax.lax.stop_gradient(x_aug)
                lsa, upd = student.apply({"params": params, "batch_stats": aux["score_state"]}, x_aug, train=True,
                                         mutable=["batch_stats"])
                if teacher is not None:
                    ft, lt = teacher_forward(teacher_vars, jnp.concatenate([x, x_aug]))
                    ft, lt, lta = first_rows(ft, batch), lt[:batch], lt[batch:]
                else:
                    ft = lt = lta = None
                loss, metrics = combine(ls.astype(jnp.float32), lsa.astype(jnp.float32), lt, lta, labels, aux)
                loss, metrics, new_d_state = add_distiller(loss, metrics, heads, d_state, fs, ft, labels, indices,
                                                           key)
                return loss, (upd["batch_stats"], new_d_state, metrics)
        else:
            score_fn = score_by_teacher(teacher_vars) if scorer == "teacher" else None
            x_aug, aux = augment(k_aug, x, labels, score_fn)
            x_aug = jax.lax.stop_gradient(x_aug)
            if teacher is not None:
                ft, lt_all = teacher_forward(teacher_vars, jnp.concatenate([x, x_aug]))
                ft, lt, lta = first_rows(ft, batch), lt_all[:batch], lt_all[batch:]
            else:
                ft = lt = lta = None

            def loss_fn(params, heads):
                variables = {"params": params, "batch_stats": state["batch_stats"]}
                if x_aug.shape[0] == batch:
                    fs, out, upd = student_forward(two_halves, variables, jnp.concatenate([x, x_aug]))
                    out = out.astype(jnp.float32)
                    fs, ls, lsa = first_rows(fs, batch), out[:batch], out[batch:]
                else:  # the picked batch differs in size (short last batch): two passes, same order
                    fs, ls, upd = student_forward(student, variables, x)
                    lsa, upd = student.apply({"params": params, **upd}, x_aug, train=True, mutable=["batch_stats"])
                    ls, lsa = ls.astype(jnp.float32), lsa.astype(jnp.float32)
                loss, metrics = combine(ls, lsa, lt, lta, labels, aux)
                loss, metrics, new_d_state = add_distiller(loss, metrics, heads, d_state, fs, ft, labels, indices,
                                                           key)
                return loss, (upd["batch_stats"], new_d_state, metrics)

        (loss, (batch_stats, new_d_state, metrics)), (grads, head_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(state["params"], heads)
        new_extra = _update_heads(tx, extra, head_grads, new_d_state) if distill else None
        new_state = _apply_update(tx, state, grads, batch_stats, new_extra)
        metrics["loss"] = loss
        return new_state, metrics

    return step

"""Pure train-step factories. A step maps ``(state, teacher_vars, images_uint8, labels, key)`` to
``(state, metrics)``; everything static (models, optimiser, scheme, loss weights) is closed over, so one compile
serves a whole run and ``lax.scan`` can run many steps per dispatch.

``state`` is a dict pytree: ``params``, ``batch_stats``, ``opt_state``, ``step`` (int32) and ``extra`` (the
distiller's trainable heads and non-trainable state; empty for plain KD).
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
    def step(state, teacher_vars, images_uint8, labels, key):
        del teacher_vars
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
    if rows != labels.shape[0]:
        raise ValueError("the scheme changes the batch size but gives no label targets (aux['targets'])")
    return onehot


def make_kd_step(student, teacher: Optional[Any], tx, prepare: Callable, augment: Callable, weights: KDWeights,
                 num_classes: int, scorer: Optional[str] = None, criterion: str = "entropy"):
    """The paper's KD step (SPEC section 3) with scheme ``augment``; ``teacher=None`` trains with labels only.

    Forward passes: teacher (inference BN, no gradient) once on concat[x, x']; student once on concat[x, x'] with
    per-half BatchNorm statistics (``bn_groups=2``), which equals the original's two train-mode passes, running
    statistics updated for x then x'. CutMixPick by student entropy keeps the original's exact order instead:
    s(x), then the no-gradient train-mode scoring pass over the pool, then s(x').
    """
    two_halves = student.clone(bn_groups=2)
    T = weights.temperature
    lw1, lw2, lw3 = (float(w) for w in weights.lw_mix)

    def teacher_logits(teacher_vars, x):
        return jax.lax.stop_gradient(teacher.apply(teacher_vars, x, train=False).astype(jnp.float32))

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

    def score_by_teacher(teacher_vars):
        def score_fn(pool):
            return losses.entropy(teacher_logits(teacher_vars, pool)), None
        return score_fn

    def step(state, teacher_vars, images_uint8, labels, key):
        k_base, k_aug = jax.random.split(key)
        x = prepare(k_base, images_uint8)
        batch = x.shape[0]

        if scorer == "student":
            def loss_fn(params):
                variables = {"params": params, "batch_stats": state["batch_stats"]}
                ls, upd = student.apply(variables, x, train=True, mutable=["batch_stats"])
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
                lt = teacher_logits(teacher_vars, jnp.concatenate([x, x_aug])) if teacher is not None else None
                lt, lta = (lt[:batch], lt[batch:]) if lt is not None else (None, None)
                loss, metrics = combine(ls.astype(jnp.float32), lsa.astype(jnp.float32), lt, lta, labels, aux)
                return loss, (upd["batch_stats"], metrics)
        else:
            score_fn = score_by_teacher(teacher_vars) if scorer == "teacher" else None
            x_aug, aux = augment(k_aug, x, labels, score_fn)
            x_aug = jax.lax.stop_gradient(x_aug)
            if teacher is not None:
                lt_all = teacher_logits(teacher_vars, jnp.concatenate([x, x_aug]))
                lt, lta = lt_all[:batch], lt_all[batch:]
            else:
                lt = lta = None

            def loss_fn(params):
                variables = {"params": params, "batch_stats": state["batch_stats"]}
                if x_aug.shape[0] == batch:
                    out, upd = two_halves.apply(variables, jnp.concatenate([x, x_aug]), train=True,
                                                mutable=["batch_stats"])
                    out = out.astype(jnp.float32)
                    ls, lsa = out[:batch], out[batch:]
                else:  # the picked batch differs in size (short last batch): two passes, same order
                    ls, upd = student.apply(variables, x, train=True, mutable=["batch_stats"])
                    lsa, upd = student.apply({"params": params, **upd}, x_aug, train=True, mutable=["batch_stats"])
                    ls, lsa = ls.astype(jnp.float32), lsa.astype(jnp.float32)
                loss, metrics = combine(ls, lsa, lt, lta, labels, aux)
                return loss, (upd["batch_stats"], metrics)

        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new_state = _apply_update(tx, state, grads, batch_stats)
        metrics["loss"] = loss
        return new_state, metrics

    return step

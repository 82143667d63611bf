"""Pure train-step factories. A step maps ``(state, teacher_vars, batch, key)`` to ``(state, metrics)``, where
``batch`` is a dict of the batch's uint8 ``images``, int ``labels`` and dataset ``indices`` (CRD's memory banks
read them; the other steps ignore them). Everything static (models, optimiser, scheme, loss weights, distiller) is
closed over, so one compile serves a whole run and ``lax.scan`` can run many steps per dispatch.

``state`` is a dict pytree: ``params`` and ``batch_stats`` (the student's own variables, exactly what evaluation and
a later ``load_model`` need), ``opt_state``, ``step`` (int32) and ``extra``. ``extra`` is ``{}`` for plain KD and for
a logit distiller (DKD, DIST: no heads, no state; DKD's warm-up reads ``step``); with a
feature distiller it is ``kdjax.distillers.make_extra``'s ``{'params': heads, 'opt_state': ..., 'state': ...}``:
the heads (CRD's embeddings, FitNet's regressor, ...) are differentiated together with the student in one backward
pass and updated by the same optax transformation (so with the same learning rate and weight decay, as the
original's single SGD over student + heads); they keep an optimiser state of their own, which keeps
``params``/``opt_state`` the student's alone. The distiller's non-trainable state (memory banks, a head's BatchNorm
statistics) is ``extra['state']``. The whole ``state`` is what ``loop.fit`` checkpoints, so heads and banks resume
exactly.

A KD step reads top to bottom: ``prepare`` (base crop+flip, normalise) -> the scheme's x' -> teacher outputs ->
student outputs -> ``kd_objective`` (its logit terms: KL_T, or a logit distiller's loss; + a feature distiller's
term) -> ``apply_update``.
"""
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from kdjax import distillers, losses
from kdjax.distillers import sample_weights
from kdjax.augment import switch as augment_switch, transforms


@dataclasses.dataclass(frozen=True)
class KDWeights:
    """Loss = gamma*CE(s(x), y) + alpha*(lw1*L(s(x), t(x)) + lw3*L(s(x'), t(x'))) [+ lw2*mixed CE on x']
    [+ beta*feature term on x], with L = KL_T (kd and the feature distillers) or a logit distiller's loss.

    ``logit_stand``: L is evaluated on z-scored logits at ``ls_temperature`` (logit standardisation); CE, the
    CutMixPick 'kld' score and anything else that reads ``temperature`` stay on the raw logits at ``temperature``.
    """
    gamma: float = 0.1
    alpha: float = 0.9
    beta: float = 0.0
    temperature: float = 4.0
    lw_mix: tuple = (1.0, 0.0, 1.0)
    logit_stand: bool = False
    ls_temperature: float = distillers.LS_TEMPERATURE
    # 'entropy': each sample's L weighted by EA-KD's entropy weight (kdjax.distillers.sample_weights)
    sample_weights: str = "none"
    # CTKD (kdjax.distillers.ctkd): L at a learned temperature instead of ``temperature`` (None: fixed)
    ctkd: Optional[Any] = None


def make_prepare(mean, std, pad: int):
    """``prepare(key, images_uint8)``: the batch x of a step (``kdjax.augment.transforms.base_train_batch``)."""
    return functools.partial(transforms.base_train_batch, mean=mean, std=std, pad=pad)


def prepare_for(dataset):
    """The ``prepare`` of a run on ``dataset``: the original's pad-crop + flip + normalise on the device, or
    normalisation only for a streamed dataset, whose host pipeline already did RandomResizedCrop + flip."""
    from kdjax.data import is_streamed

    if is_streamed(dataset):
        return lambda key, images: transforms.normalize(images, dataset.mean, dataset.std)
    return make_prepare(dataset.mean, dataset.std, transforms.default_pad(dataset.image_size))


def apply_update(tx, state, grads, batch_stats, extra=None):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = dict(state, params=optax.apply_updates(state["params"], updates), batch_stats=batch_stats,
               opt_state=opt_state, step=state["step"] + 1)
    if extra is not None:
        new["extra"] = extra
    return new


def _top1(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def make_ce_step(model, tx, prepare: Callable):
    """Teacher training: cross-entropy on the base-augmented batch."""
    def step(state, teacher_vars, batch, key):
        del teacher_vars
        x, labels = prepare(key, batch["images"]), batch["labels"]

        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": state["batch_stats"]}, x, train=True,
                                      mutable=["batch_stats"])
            return losses.cross_entropy(logits, labels), (upd["batch_stats"], logits)

        (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        return apply_update(tx, state, grads, batch_stats), {"loss": loss, "ce": loss, "top1": _top1(logits, labels)}
    return step


# ------------------------------------------------------------------------------------------- the KD step's parts


def teacher_outputs(teacher, teacher_vars, x, with_features: bool, preact: bool = False):
    """(features or None, float32 logits) of the teacher in inference mode, both constants; ``preact``: its
    pre-activation features (a distiller's ``teacher_preact``)."""
    if not with_features:
        return None, jax.lax.stop_gradient(teacher.apply(teacher_vars, x, train=False).astype(jnp.float32))
    asked = {"preact": True} if preact else {}  # only when asked: a user-registered model may lack the keyword
    feats, logits = teacher.apply(teacher_vars, x, train=False, features=True, **asked)
    return jax.lax.stop_gradient(feats), jax.lax.stop_gradient(logits.astype(jnp.float32))


def student_outputs(module, variables, x, with_features: bool):
    """Train-mode pass: (features or None, logits, BatchNorm updates); features only when a distiller uses them,
    so that the plain KD program is the one without features."""
    if with_features:
        (feats, logits), upd = module.apply(variables, x, train=True, features=True, mutable=["batch_stats"])
        return feats, logits, upd
    logits, upd = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return None, logits, upd


def first_rows(feats, rows: int):
    return None if feats is None else [f[:rows] for f in feats]


def logit_term(weights: KDWeights, distiller=None, aug: bool = False):
    """``term(logits_s, logits_t, labels, epoch)``: what each logit pair (x, x') contributes to the logit block.

    KD's KL_T for ``kd`` (or no distiller) and the feature distillers, a logit distiller's ``logit_loss`` otherwise
    (``logit_loss_aug`` for the pair on x' when ``aug``: MLKD's strong view); with ``weights.logit_stand`` both
    logits are z-scored first and the base temperature replaces T, for these terms only (logit standardisation and
    sample weights apply to kd and dkd alone, whose two views share one term)."""
    d = distillers.Distiller() if distiller is None else distiller
    if weights.sample_weights != "none":
        return sample_weights.weighted_term(weights, d)
    if weights.logit_stand:
        distillers.check_logit_stand(d)

        def term(ls, lt, labels, epoch, temperature=None):
            del temperature  # the base temperature (CTKD is refused with logit standardisation)
            return d.logit_loss(distillers.standardize(ls), distillers.standardize(lt), labels, epoch,
                                weights.ls_temperature)
        return term
    loss = d.logit_loss_aug if aug else d.logit_loss

    def term(ls, lt, labels, epoch, temperature=None):
        """``temperature``: CTKD's learned one (traced), else the fixed ``weights.temperature``."""
        return loss(ls, lt, labels, epoch, weights.temperature if temperature is None else temperature)
    return term


def kd_objective(weights: KDWeights, num_classes: int, has_teacher: bool, distiller=None):
    """``objective(ls, lsa, lt, lta, labels, aux, epoch, temperature) -> (loss, metrics)`` from the student's logits
    on x and x' and the teacher's (None without a teacher: CE on x and on x' with the scheme's mixed labels).
    ``epoch`` is the step's 1-based epoch, read only by a logit distiller with a schedule (DKD's warm-up);
    ``temperature`` is CTKD's learned temperature of the logit terms (None: ``weights.temperature``)."""
    lw1, lw2, lw3 = (float(w) for w in weights.lw_mix)
    term, term_aug = logit_term(weights, distiller), logit_term(weights, distiller, aug=True)
    ce_on_aug = distiller is not None and distiller.ce_on_aug
    replaced = distiller is not None and distiller.replaces_kl
    # metric names: "kl" stays the KD term's (the logs of every KD run), a logit distiller's is "logit"
    name = "logit" if replaced else "kl"

    def objective(ls, lsa, lt, lta, labels, aux, epoch=1, temperature=None):
        ce = losses.cross_entropy(ls, labels)
        metrics = {"ce": ce, "top1": _top1(ls, labels)}
        if not has_teacher:
            soft = transforms.mixed_targets(aux, labels, num_classes, lsa.shape[0])
            ce_aug = jnp.mean(optax.softmax_cross_entropy(lsa, soft))
            metrics["ce_aug"] = ce_aug
            return lw1 * ce + lw3 * ce_aug, metrics
        labels_aug = None
        if replaced and distiller.uses_labels:  # the dominant label of each row of x' (a mixed image's larger part)
            labels_aug = transforms.dominant_labels(aux, labels, num_classes, lsa.shape[0])
        kl, kl_aug = term(ls, lt, labels, epoch, temperature), term_aug(lsa, lta, labels_aug, epoch, temperature)
        loss = weights.gamma * ce + weights.alpha * (lw1 * kl + lw3 * kl_aug)
        if ce_on_aug:  # MLKD: CE on the strong view too, with CE's weight (mixed labels under a mixing scheme)
            ce_aug = jnp.mean(optax.softmax_cross_entropy(
                lsa, transforms.mixed_targets(aux, labels, num_classes, lsa.shape[0])))
            metrics["ce_aug"] = ce_aug
            loss = loss + weights.gamma * ce_aug
        if lw2:
            soft = transforms.mixed_targets(aux, labels, num_classes, lsa.shape[0])
            loss = loss + weights.alpha * lw2 * jnp.mean(optax.softmax_cross_entropy(lsa, soft))
        metrics.update({name: kl, f"{name}_aug": kl_aug})
        return loss, metrics

    return objective


def student_pool_scorer(student, frozen_params, batch_stats, teacher_logits_of, criterion: str, T: float):
    """CutMixPick's ``score_fn`` by the training student: a train-mode pass over the pool with the statistics of
    s(x), no gradient; its updated statistics carry on to s(x'), the original's order of passes."""
    def score_fn(pool):
        logits, pool_upd = student.apply({"params": frozen_params, "batch_stats": batch_stats}, pool, train=True,
                                         mutable=["batch_stats"])
        logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
        if criterion == "kld":
            return losses.kd_kl_per_sample(logits, teacher_logits_of(pool), T), pool_upd["batch_stats"]
        return losses.entropy(logits), pool_upd["batch_stats"]
    return score_fn


# ----------------------------------------------------------------------------------------------- the KD step


def make_kd_step(student, teacher: Optional[Any], tx, prepare: Callable, scheme: Callable, weights: KDWeights,
                 num_classes: int, distiller=None, steps_per_epoch: Optional[int] = None):
    """The paper's KD step with ``scheme``; ``teacher=None`` trains with labels only.

    Forward passes: teacher (inference BN, no gradient) once on concat[x, x']; student once on concat[x, x'] with
    per-half BatchNorm statistics (``bn_groups=2``), which equals the original's two train-mode passes, running
    statistics updated for x then x'. A scheme scored by the student (CutMixPick S. ent., or the 'kld' criterion)
    keeps the original's exact order instead: s(x), then the scoring pass over the pool, then s(x').

    ``distiller`` (``None`` or ``kd``: plain KD, the exact same program as without it): a feature distiller adds
    ``weights.beta * L(feats_s, feats_t)`` on the original batch x, from the same passes asked for features; a
    logit distiller replaces KL_T on x and x' (``kd_objective``). ``steps_per_epoch`` gives the step's epoch,
    ``state['step'] // steps_per_epoch + 1``, to a logit distiller that reads it (DKD's warm-up), to a feature
    term that follows it (``term_follows_epoch``: ReviewKD's warm-up, ``weights.beta * term_scale(epoch) * L``)
    and to CTKD.

    ``scheme`` may be a ``kdjax.augment.switch.SchemeSwitch``: the step then runs the scheme whose index the batch
    carries (``batch['scheme']``), one program for all the switch's schemes.

    ``weights.ctkd`` (CTKD): the logit terms run at the learned temperature of ``state['extra']['ctkd']['params']``
    (differentiated with the student in the same backward pass, its gradient scaled by the curriculum's lambda of
    the epoch, updated by ``tx`` with an optimiser state of its own, as the original's one SGD over both).
    """
    two_halves = student.clone(bn_groups=2)
    distill = distillers.has_feature_term(distiller)
    with_features = distill and distiller.uses_features
    replaced = distiller is not None and distiller.replaces_kl
    scaled_term = distill and distiller.term_follows_epoch
    teacher_preact = with_features and distiller.teacher_preact
    scored_by = getattr(scheme, "scored_by", None)
    criterion = getattr(scheme, "criterion", None) or "entropy"
    objective = kd_objective(weights, num_classes, teacher is not None, distiller)
    switched = isinstance(scheme, augment_switch.SchemeSwitch)
    if distiller is not None and distiller.needs_teacher and teacher is None:
        what = "logits" if replaced else "features"
        raise ValueError(f"distiller={distiller.name} distils the teacher's {what} and needs a teacher: set "
                         "teacher= and --config.teacher_checkpoint, or use distiller=kd")
    if weights.logit_stand and teacher is None:
        raise ValueError("loss.logit_stand standardises the teacher's logits and needs a teacher: set teacher= "
                         "and --config.teacher_checkpoint, or unset loss.logit_stand")
    ctkd = weights.ctkd
    if (replaced or scaled_term or ctkd is not None) and steps_per_epoch is None:
        who = "ctkd.mode" if ctkd is not None else f"distiller={distiller.name}"
        raise ValueError(f"{who} needs steps_per_epoch (its loss follows the epoch)")

    def epoch_of(step):
        """The 1-based epoch of a step counted from 0, as the official trainers count epochs."""
        return step // int(steps_per_epoch) + 1 if replaced or scaled_term or ctkd is not None else 1
    teacher_logits_of = lambda tv: lambda images: teacher_outputs(teacher, tv, images, False)[1]  # noqa: E731

    def targets(teacher_vars, x, x_aug, rows):
        """The teacher's (features of x, logits of x, logits of x'), or Nones without a teacher."""
        if teacher is None:
            return None, None, None
        ft, lt = teacher_outputs(teacher, teacher_vars, jnp.concatenate([x, x_aug]), with_features, teacher_preact)
        return first_rows(ft, rows), lt[:rows], lt[rows:]

    def total(params, trainables, d_state, outputs, labels, aux, batch, key, epoch):
        """The objective, plus the distiller's term on x; returns (loss, (batch_stats, new d_state, metrics)).
        ``trainables``: (the distiller's heads, CTKD's temperature parameter), both differentiated."""
        heads, t_params = trainables
        fs, ls, lsa, ft, lt, lta, batch_stats = outputs
        temperature = None if ctkd is None else ctkd.temperature(t_params["theta"], epoch)
        loss, metrics = objective(ls.astype(jnp.float32), lsa.astype(jnp.float32), lt, lta, labels, aux, epoch,
                                  temperature)
        if temperature is not None:
            metrics["temperature"] = temperature
        if distill:
            term, d_state = distiller.loss(heads, d_state, fs, ft, labels=labels, indices=batch.get("indices"),
                                           key=jax.random.fold_in(key, distillers.DISTILLER_KEY), train=True)
            metrics["distill"] = term
            loss = loss + weights.beta * (distiller.term_scale(epoch) * term if scaled_term else term)
        return loss, (batch_stats, d_state, metrics)

    def step(state, teacher_vars, batch, key):
        if distill and distiller.needs_indices and batch.get("indices") is None:
            raise ValueError(f"distiller={distiller.name} needs the batch's dataset indices: pass batch['indices']")
        k_base, k_aug = jax.random.split(key)
        x, labels = prepare(k_base, batch["images"]), batch["labels"]
        rows, extra = x.shape[0], state["extra"]
        heads, d_state = (extra["params"], extra["state"]) if distill else ({}, {})
        trainables = (heads, extra["ctkd"]["params"] if ctkd is not None else {})
        epoch = epoch_of(state["step"])

        if scored_by == "student":  # s(x), scoring pass, s(x'): the augmentation happens inside the loss
            def loss_fn(params, trainables):
                variables = {"params": params, "batch_stats": state["batch_stats"]}
                fs, ls, upd = student_outputs(student, variables, x, with_features)
                score_fn = student_pool_scorer(student, jax.lax.stop_gradient(params), upd["batch_stats"],
                                               teacher_logits_of(teacher_vars), criterion, weights.temperature)
                x_aug, aux = scheme(k_aug, x, labels, score_fn)
                x_aug = jax.lax.stop_gradient(x_aug)
                lsa, upd = student.apply({"params": params, "batch_stats": aux["score_state"]}, x_aug, train=True,
                                         mutable=["batch_stats"])
                ft, lt, lta = targets(teacher_vars, x, x_aug, rows)
                return total(params, trainables, d_state, (fs, ls, lsa, ft, lt, lta, upd["batch_stats"]), labels,
                             aux, batch, key, epoch)
        else:
            score_fn = None
            if scored_by == "teacher":
                score_fn = lambda pool: (losses.entropy(teacher_logits_of(teacher_vars)(pool)), None)  # noqa: E731
            if switched:  # the run's scheme picked by data: one program for every scheme of the switch
                x_aug, aux = scheme(batch["scheme"], k_aug, x, labels, num_classes)
            else:
                x_aug, aux = scheme(k_aug, x, labels, score_fn)
            x_aug = jax.lax.stop_gradient(x_aug)
            ft, lt, lta = targets(teacher_vars, x, x_aug, rows)

            def loss_fn(params, trainables):
                variables = {"params": params, "batch_stats": state["batch_stats"]}
                if x_aug.shape[0] == rows:
                    fs, out, upd = student_outputs(two_halves, variables, jnp.concatenate([x, x_aug]), with_features)
                    fs, ls, lsa = first_rows(fs, rows), out[:rows], out[rows:]
                else:  # the picked batch differs in size (short last batch): two passes, same order
                    fs, ls, upd = student_outputs(student, variables, x, with_features)
                    lsa, upd = student.apply({"params": params, **upd}, x_aug, train=True, mutable=["batch_stats"])
                return total(params, trainables, d_state, (fs, ls, lsa, ft, lt, lta, upd["batch_stats"]), labels,
                             aux, batch, key, epoch)

        (loss, (batch_stats, new_d_state, metrics)), (grads, (head_grads, t_grads)) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(state["params"], trainables)
        new_extra = distillers.update_heads(tx, extra, head_grads, new_d_state) if distill else None
        if ctkd is not None:  # the temperature parameter's own SGD update (its gradient already scaled by lambda)
            new_extra = dict(extra if new_extra is None else new_extra,
                             ctkd=distillers.update_heads(tx, extra["ctkd"], t_grads, {}))
        metrics["loss"] = loss
        return apply_update(tx, state, grads, batch_stats, new_extra), metrics

    return step

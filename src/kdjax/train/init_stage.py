"""The init stage of the two-stage distillers (``ab``, ``ft``, ``fsp``): what the original trains before KD
(its ``helper/pretrain.py``), run by the same driver as every training (``loop.fit``), in ``<workdir>/init_stage``,
so that it is checkpointed, resumable after a kill and logged like any run.

What it trains, as the original:

* the distiller's init-stage heads (AB's connectors, FT's paraphraser), and
* for ``ab`` and ``fsp`` (``init_trains_student``) the student's *feature modules* (``models.feature_mask``: all
  but the classifier, and for some families the last layers after the features, as ``get_feat_modules``);
  their BatchNorm statistics follow the batches (the original puts those modules in train mode), those of the
  other modules stay as they were (the original keeps the rest of the student in eval mode);
* the teacher is a constant in inference mode; FT's stage never runs the student.

The optimiser is the original's: a new SGD (momentum and coupled weight decay of ``config.optim``) at a constant
learning rate ``distiller.init_stage_lr`` (the student's lr; 0.01 for FT on CIFAR ResNet/WRN students), for
``distiller.init_epochs`` epochs over the same base-augmented training batches (crop+flip; no DA scheme: the
original's init stage reads the plain training loader). Parameters outside the trained set are never touched:
``optax.multi_transform`` sends them to ``set_to_zero``, so not even weight decay reaches them.
"""
import dataclasses
import json
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from kdjax import models
from kdjax.train import recipe as recipe_lib

INIT_STAGE_DIR = "init_stage"
# fold_in constant of the init stage's run key, apart from the KD stage's (the KD stage's randomness does not
# depend on whether an init stage ran).
INIT_STAGE_KEY = 0x696E6974


def init_stage_dir(workdir: str) -> str:
    return os.path.join(workdir, INIT_STAGE_DIR)


def trained_labels(student_name: str, params, heads, trains_student: bool):
    """multi_transform labels of ``{'student': params, 'heads': heads}``: 'train' or 'frozen' per leaf."""
    if trains_student:
        student = jax.tree.map(lambda m: "train" if m else "frozen", models.feature_mask(student_name, params))
    else:
        student = jax.tree.map(lambda _: "frozen", params)
    return {"student": student, "heads": jax.tree.map(lambda _: "train", heads)}


def make_init_recipe(recipe: recipe_lib.Recipe, distiller, student_name: str, params, heads):
    """The init stage's ``Recipe``: the KD stage's epoch plan, dispatch chunk, momentum and weight decay,
    ``distiller.init_epochs`` epochs, a constant lr, and SGD on the trained set only."""
    lr = float(distiller.init_stage_lr(student_name, recipe.base_lr))
    sgd, schedule = recipe_lib.make_optimizer(lr, recipe.plan.steps_per_epoch, (), 1.0, recipe.momentum,
                                              recipe.weight_decay)
    labels = trained_labels(student_name, params, heads, distiller.init_trains_student)
    tx = optax.multi_transform({"train": sgd, "frozen": optax.set_to_zero()}, labels)
    return dataclasses.replace(recipe, epochs=int(distiller.init_epochs), base_lr=lr, decay_epochs=(),
                               decay_rate=1.0, tx=tx, schedule=schedule)


def init_stage_state(tx, student_state: Dict[str, Any], heads) -> Dict[str, Any]:
    """The init stage's state: the student's variables (what ``fit`` evaluates), the heads in ``extra``, and the
    optimiser state of both together."""
    trained = {"student": student_state["params"], "heads": heads}
    return {"params": student_state["params"], "batch_stats": student_state["batch_stats"],
            "opt_state": tx.init(trained), "step": jnp.zeros((), jnp.int32), "extra": {"params": heads}}


def make_init_step(student, student_name: str, teacher, tx, prepare, distiller):
    """``step(state, teacher_vars, batch, key)`` of the init stage: the distiller's ``init_stage_loss`` on the
    teacher's and (when it trains the student) the train-mode student's features of the base-augmented batch."""
    asked = {"preact": True} if distiller.preact else {}  # only when asked: plugins may lack the keyword
    trains_student = bool(distiller.init_trains_student)

    def step(state, teacher_vars, batch, key):
        x = prepare(jax.random.split(key)[0], batch["images"])  # the KD step's base key: the same x
        feats_t, _ = teacher.apply(teacher_vars, x, train=False, features=True, **asked)
        feats_t = [jax.lax.stop_gradient(jnp.asarray(f).astype(jnp.float32)) for f in feats_t]

        def loss_fn(trained):
            if not trains_student:
                return distiller.init_stage_loss(trained["heads"], None, feats_t), state["batch_stats"]
            variables = {"params": trained["student"], "batch_stats": state["batch_stats"]}
            (feats_s, _), upd = student.apply(variables, x, train=True, features=True, **asked,
                                              mutable=["batch_stats"])
            feats_s = [jnp.asarray(f).astype(jnp.float32) for f in feats_s]
            # statistics move only in the modules the original switches to train mode
            mask = models.feature_mask(student_name, state["batch_stats"])
            stats = jax.tree.map(lambda m, new, old: new if m else old, mask, upd["batch_stats"],
                                 state["batch_stats"])
            return distiller.init_stage_loss(trained["heads"], feats_s, feats_t), stats

        trained = {"student": state["params"], "heads": state["extra"]["params"]}
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        updates, opt_state = tx.update(grads, state["opt_state"], trained)
        trained = optax.apply_updates(trained, updates)
        new = dict(state, params=trained["student"], batch_stats=batch_stats, opt_state=opt_state,
                   step=state["step"] + 1, extra={"params": trained["heads"]})
        return new, {"loss": loss, "init_loss": loss}

    return step


def last_epoch_train_loss(stage_dir: str, epoch: int) -> float:
    """The step-weighted mean training loss of ``epoch`` from the stage's metrics.jsonl (nan when absent)."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return float("nan")
    total, steps, previous = 0.0, 0, 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "loss" not in row or "test_loss" in row:  # train rows only: one per dispatched chunk
                continue
            if row.get("epoch") == epoch:
                total += row["loss"] * (row["step"] - previous)
                steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else float("nan")

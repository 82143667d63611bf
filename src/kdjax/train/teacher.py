"""A teacher run: cross-entropy on the base crop+flip, the paper's recipe (the library half of ``kdjax teacher``)."""
from typing import Any, Dict

import jax

from kdjax import models
from kdjax.train import loop, recipe as recipe_lib, steps


def train_teacher(spec: recipe_lib.TrainingSpec, workdir: str, dataset, data, mesh) -> Dict[str, Any]:
    """Train ``spec.model`` on ``data`` (``dataset`` placed on ``mesh``) in ``workdir``; returns ``fit``'s
    output with the recipe."""
    recipe = recipe_lib.make_recipe(spec, dataset.num_train, mesh.size)
    model = models.create(spec.model, dataset.num_classes, dataset.image_size, recipe_lib.compute_dtype(spec.dtype))
    run_key = jax.random.key(spec.seed)
    prepare = steps.prepare_for(dataset)
    trainee = loop.Trainee(
        name="teacher", step_fn=steps.make_ce_step(model, recipe.tx, prepare),
        state=recipe_lib.init_state(model, recipe.tx, jax.random.fold_in(run_key, 0), dataset.image_size),
        teacher_vars=None, eval_model=model, meta=recipe_lib.model_meta(spec.model, dataset), run_key=run_key,
        dtype=spec.dtype)
    return dict(loop.fit(workdir, spec.bookkeeping, recipe, trainee, data, mesh), recipe=recipe, seed=spec.seed)

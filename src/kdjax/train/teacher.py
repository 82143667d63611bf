"""A teacher run: cross-entropy on the base crop+flip, the paper's recipe (the library half of ``kdjax teacher``)."""
from typing import Any, Dict

import jax

from kdjax import models
from kdjax.train import loop, recipe as recipe_lib, steps


def train_teacher(config, workdir: str, dataset, data, mesh) -> Dict[str, Any]:
    """Train ``config.model`` on ``data`` (``dataset`` placed on ``mesh``) in ``workdir``; returns ``fit``'s
    output with the recipe."""
    recipe = recipe_lib.make_recipe(config, dataset.num_train, mesh.size, config.model)
    model = models.create(config.model, dataset.num_classes, dataset.image_size,
                          recipe_lib.compute_dtype(config.dtype))
    run_key = jax.random.key(int(config.seed))
    prepare = steps.prepare_for(dataset)
    trainee = loop.Trainee(
        name="teacher", step_fn=steps.make_ce_step(model, recipe.tx, prepare),
        state=recipe_lib.init_state(model, recipe.tx, jax.random.fold_in(run_key, 0), dataset.image_size),
        teacher_vars=None, eval_model=model, meta=recipe_lib.model_meta(config.model, dataset), run_key=run_key)
    return dict(loop.fit(workdir, config, recipe, trainee, data, mesh), recipe=recipe, seed=int(config.seed))

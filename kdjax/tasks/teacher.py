"""Task 'teacher': train a model with cross-entropy on the base crop+flip, write checkpoints and results.json."""
import time

import jax

from kdjax import models, parallel, workdir as workdir_lib
from kdjax.augment import transforms
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.train import loop, recipe as recipe_lib, steps


def run(config, workdir):
    models.check_name(config.model)  # every name and field is checked before data loading and compiling
    common.validate_run(config, config.model)
    return common.run_once("teacher", workdir, config, _train)


def _train(config, workdir):
    dtype = common.compute_dtype(config.dtype)
    started = time.time()
    cache_before = common.start_compilation_cache(config)
    dataset = common.load_dataset(config)
    mesh = parallel.make_mesh()
    recipe = recipe_lib.make_recipe(config, dataset.num_train, mesh.size, config.model)  # batch vs dataset
    workdir_lib.claim(workdir, config)  # after every check that can refuse the launch
    model = models.create(config.model, dataset.num_classes, dataset.image_size, dtype)
    run_key = jax.random.key(int(config.seed))
    prepare = steps.make_prepare(dataset.mean, dataset.std, transforms.default_pad(dataset.image_size))
    trainee = loop.Trainee(
        name="teacher", step_fn=steps.make_ce_step(model, recipe.tx, prepare),
        state=common.init_state(model, recipe.tx, jax.random.fold_in(run_key, 0), dataset.image_size),
        teacher_vars=None, eval_model=model, meta=common.model_meta(config.model, dataset), run_key=run_key)
    out = dict(loop.fit(workdir, config, recipe, trainee, DeviceDataset.create(dataset, mesh), mesh),
               cache_before=cache_before)
    fields = {"task": "teacher", "model": config.model, "dataset": dataset.name}
    return common.finish_training(workdir, config, fields, out, recipe, started, config.model)

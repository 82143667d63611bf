"""Task 'teacher': train a model with cross-entropy on the base crop+flip, write checkpoints and results.json."""
import time

import jax

from kdjax import models, workdir as workdir_lib
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.train import loop, steps


def run(config, workdir):
    models.check_name(config.model)  # every name is checked before data loading and compiling
    dtype = common.compute_dtype(config.dtype)
    workdir_lib.claim(workdir, config)
    started = time.time()

    dataset = common.load_dataset(config)
    mesh = common.make_mesh()
    training = common.training_recipe(config, dataset, mesh, config.model)
    model = models.create(config.model, dataset.num_classes, dataset.image_size, dtype)
    run_key = jax.random.key(int(config.seed))
    state = common.init_state(model, training.tx, jax.random.fold_in(run_key, 0), dataset.image_size)
    prepare = steps.make_prepare(dataset.mean, dataset.std, common.base_pad(dataset.image_size))
    out = loop.fit(workdir=workdir, config=config, epochs=training.epochs, mesh=mesh,
                   data=DeviceDataset.create(dataset, mesh), plan=training.plan,
                   step_fn=steps.make_ce_step(model, training.tx, prepare), state=state, teacher_vars=None,
                   eval_model=model, eval_mean=dataset.mean, eval_std=dataset.std, schedule=training.schedule,
                   meta=common.model_meta(config.model, dataset), run_key=run_key, name="teacher")
    fields = {"task": "teacher", "model": config.model, "dataset": dataset.name}
    return common.finish_training(workdir, config, fields, out, training, started, config.model)

"""Task 'teacher': train a model with cross-entropy on the base crop+flip, write checkpoints and results.json."""
import time

import jax

from kdjax import models, runlog, workdir as workdir_lib
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.train import loop, optim, steps


def run(config, workdir):
    models.check_name(config.model)  # every name is checked before data loading and compiling
    dtype = common.compute_dtype(config.dtype)
    workdir_lib.claim(workdir, config)
    started = time.time()

    dataset = common.load_dataset(config)
    mesh = common.make_mesh()
    epochs = int(config.epochs) * max(int(config.epoch_factor), 1)
    plan = loop.make_plan(dataset.num_train, int(config.batch_size), mesh.size, loop.steps_per_dispatch_for_backend(config.steps_per_dispatch),
                          config.last_batch)
    base_lr = optim.default_lr(config.model, config.optim.lr)
    tx, schedule = optim.make_optimizer(base_lr, plan.steps_per_epoch,
                                        optim.scaled_decay_epochs(config.optim.decay_epochs, config.epoch_factor),
                                        config.optim.decay_rate, config.optim.momentum, config.optim.weight_decay)
    model = models.create(config.model, dataset.num_classes, dataset.image_size, dtype)
    run_key = jax.random.key(int(config.seed))
    state = common.init_state(model, tx, jax.random.fold_in(run_key, 0), dataset.image_size)
    prepare = steps.make_prepare(dataset.mean, dataset.std, common.base_pad(dataset.image_size))
    step_fn = steps.make_ce_step(model, tx, prepare)
    data = DeviceDataset.create(dataset, mesh)
    meta = common.model_meta(config.model, dataset)

    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
        run_config.epochs = epochs
    out = loop.fit(workdir=workdir, config=run_config, mesh=mesh, data=data, plan=plan, step_fn=step_fn,
                   state=state, teacher_vars=None, eval_model=model, eval_mean=dataset.mean,
                   eval_std=dataset.std, schedule=schedule, meta=meta, run_key=run_key, name="teacher")
    results = {"task": "teacher", "model": config.model, "dataset": dataset.name, "seed": int(config.seed),
               "epochs": epochs, "test_loss": out["test_loss"], "top1": out["top1"], "top5": out["top5"],
               "wall_s": time.time() - started, "images_per_s": out["images_per_s"], "lr": base_lr}
    path = runlog.write_results(workdir, results, config)
    print(f"[teacher] {config.model} on {dataset.name}: test_loss {out['test_loss']:.4f} top1 {out['top1']:.4f}; "
          f"results in {path}", flush=True)
    return results

"""Task 'distill': train a student by KD (or labels only, ``teacher=none``) with one augmentation scheme."""
import time

import jax
from absl import logging

from kdjax import augment, models, runlog, workdir as workdir_lib
from kdjax.checkpoint import check_meta, load_model
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.train import loop, optim, steps

NO_TEACHER = "none"


def kd_weights(config) -> steps.KDWeights:
    """The paper's weights unless the config sets them: gamma 0.1 (CE), alpha 0.9 (KL block), beta 0."""
    loss = config.loss

    def pick(value, default):
        return float(default if value is None else value)

    return steps.KDWeights(gamma=pick(loss.gamma, 0.1), alpha=pick(loss.alpha, 0.9), beta=pick(loss.beta, 0.0),
                           temperature=float(loss.temperature), lw_mix=tuple(float(w) for w in loss.lw_mix))


def validate(config) -> None:
    """Every name and combination is checked here, before data loading or compiling."""
    if config.teacher != NO_TEACHER:
        models.check_name(config.teacher)
    models.check_name(config.student)
    augment.check_name(config.aug)
    common.compute_dtype(config.dtype)
    if config.distiller != "kd":
        raise ValueError(f"unknown distiller {config.distiller!r}; valid distillers: kd")
    if config.teacher == NO_TEACHER and config.aug == "cutmix_pick_t":
        raise ValueError("aug=cutmix_pick_t scores by teacher entropy and needs a teacher: set teacher= and "
                         "--config.teacher_checkpoint")
    if config.teacher != NO_TEACHER and not config.teacher_checkpoint:
        raise ValueError(f"teacher={config.teacher} needs --config.teacher_checkpoint=DIR (a workdir of "
                         f"configs/teacher.py, or a checkpoint written by configs/import_torch.py); or teacher=none")
    lw = tuple(config.loss.lw_mix)
    if len(lw) != 3:
        raise ValueError(f"loss.lw_mix needs three weights [KL(x), mixed CE(x'), KL(x')], got {lw}")


def run(config, workdir):
    validate(config)
    teacher_vars, teacher_meta = (None, None)
    if config.teacher != NO_TEACHER:
        teacher_vars, teacher_meta = load_model(config.teacher_checkpoint)  # fails fast when missing or damaged
        check_meta(teacher_meta, config.teacher_checkpoint, model=config.teacher)
    workdir_lib.claim(workdir, config)
    common.maybe_initialize_distributed()
    started = time.time()

    dataset = common.load_dataset(config)
    if teacher_meta is not None:
        check_meta(teacher_meta, config.teacher_checkpoint, num_classes=dataset.num_classes,
                   image_size=dataset.image_size)
        if teacher_meta.get("dataset") not in (None, dataset.name):
            logging.warning("teacher %s was trained on %s, the student on %s", config.teacher,
                            teacher_meta.get("dataset"), dataset.name)
    dtype = common.compute_dtype(config.dtype)
    mesh = common.make_mesh()
    epochs = int(config.epochs) * max(int(config.epoch_factor), 1)
    batch = int(config.batch_size)
    plan = loop.make_plan(dataset.num_train, batch, mesh.size, int(config.steps_per_dispatch), config.last_batch)
    base_lr = optim.default_lr(config.student, config.optim.lr)
    tx, schedule = optim.make_optimizer(base_lr, plan.steps_per_epoch,
                                        optim.scaled_decay_epochs(config.optim.decay_epochs, config.epoch_factor),
                                        config.optim.decay_rate, config.optim.momentum, config.optim.weight_decay)
    student = models.create(config.student, dataset.num_classes, dataset.image_size, dtype)
    teacher = (models.create(config.teacher, dataset.num_classes, dataset.image_size, dtype)
               if teacher_vars is not None else None)
    scheme = augment.create(config.aug, dataset_stats=dataset, per_sample=bool(config.augment.per_sample),
                            mix_n_run=int(config.augment.mix_n_run),
                            n_pick=config.augment.n_pick if config.augment.n_pick is not None else batch,
                            criterion=config.augment.criterion)
    scorer = getattr(scheme, "scorer", None)
    if config.augment.criterion == "kld" and scorer is not None:
        scorer = "student"  # the kld score needs the student's train-mode pass, in the original's order
    step_fn = steps.make_kd_step(student, teacher, tx,
                                 steps.make_prepare(dataset.mean, dataset.std, common.base_pad(dataset.image_size)),
                                 scheme, kd_weights(config), dataset.num_classes, scorer=scorer,
                                 criterion=config.augment.criterion)
    run_key = jax.random.key(int(config.seed))
    state = common.init_state(student, tx, jax.random.fold_in(run_key, 0), dataset.image_size)
    data = DeviceDataset.create(dataset, mesh)
    meta = common.model_meta(config.student, dataset, {"teacher": config.teacher, "aug": config.aug})

    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
        run_config.epochs = epochs
    out = loop.fit(workdir=workdir, config=run_config, mesh=mesh, data=data, plan=plan, step_fn=step_fn,
                   state=state, teacher_vars=teacher_vars, eval_model=student, eval_mean=dataset.mean,
                   eval_std=dataset.std, schedule=schedule, meta=meta, run_key=run_key, name="distill")
    results = {"task": "distill", "teacher": config.teacher, "student": config.student, "dataset": dataset.name,
               "aug": config.aug, "distiller": config.distiller, "seed": int(config.seed), "epochs": epochs,
               "test_loss": out["test_loss"], "top1": out["top1"], "top5": out["top5"],
               "wall_s": time.time() - started, "images_per_s": out["images_per_s"], "lr": base_lr}
    path = runlog.write_results(workdir, results, config)
    print(f"[distill] {config.teacher}->{config.student} {config.aug} on {dataset.name}: test_loss "
          f"{out['test_loss']:.4f} top1 {out['top1']:.4f}; results in {path}", flush=True)
    return results

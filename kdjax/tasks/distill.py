"""Task 'distill': train a student by KD (or labels only, ``teacher=none``) with one augmentation scheme, optionally
with a feature distiller beside KD (``distiller=crd|hint|at|sp|pkt|rkd|vid|nst|kdsvd|cc``) or a logit distiller in
place of KD's KL terms (``distiller=dkd|dist``), and logit standardisation (``loss.logit_stand``) of kd or dkd."""
import sys
import time

import jax
import jax.numpy as jnp

from kdjax import augment, distillers, models, parallel, workdir as workdir_lib
from kdjax.augment import transforms
from kdjax.checkpoint import read_meta
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.train import init_stage, loop, recipe as recipe_lib, steps

NO_TEACHER = "none"


def distiller_options(config) -> dict:
    """The ``config.distill`` fields that are set (not None): they replace the chosen distiller's defaults."""
    options = config.get("distill")
    return {k: v for k, v in (options.to_dict() if options is not None else {}).items() if v is not None}


def make_distiller(config) -> distillers.Distiller:
    """The configured distiller; an option it does not have fails with the list of its valid options."""
    return distillers.create(config.distiller, **distiller_options(config))


def logit_stand(config) -> bool:
    return bool(config.loss.get("logit_stand", False))


def kd_weights(config, distiller=None) -> steps.KDWeights:
    """gamma (CE), alpha (logit block), beta (feature distiller): the distiller's defaults for the scheme
    (``distillers.resolve_weights``: 0.1 / 0.9 / 0 for plain KD, the paper's; 0.1 / 9 for KD with logit
    standardisation), replaced by every weight the config sets."""
    loss = config.loss
    distiller = make_distiller(config) if distiller is None else distiller
    w = distillers.resolve_weights(distiller, config.aug, gamma=loss.gamma, alpha=loss.alpha, beta=loss.beta,
                                   logit_stand=logit_stand(config))
    return steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"],
                           temperature=float(loss.temperature), lw_mix=tuple(float(w) for w in loss.lw_mix),
                           logit_stand=logit_stand(config),
                           ls_temperature=float(loss.get("ls_temperature", distillers.LS_TEMPERATURE)))


def feature_shapes(model, variables, batch: int, image_size: int, preact: bool = False):
    """The shapes of ``model.apply(..., features=True)``'s feature list for a batch, without running it."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    asked = {"preact": True} if preact else {}  # only when asked: a user-registered model may lack the keyword
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False, features=True, **asked)[0], variables, x)


def abstract_feature_shapes(model_name: str, num_classes: int, image_size: int, batch: int, preact: bool):
    """The feature shapes of a freshly initialised ``model_name``, without computing anything."""
    model = models.create(model_name, num_classes, image_size, jnp.float32)
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return feature_shapes(model, variables, batch, image_size, preact)


def check_feature_shapes(config, distiller, num_classes: int) -> None:
    """A distiller that cannot pair these two models' features (FSP's equal channels) fails here, in one line,
    before any data is loaded."""
    if config.teacher == NO_TEACHER or type(distiller).check_shapes is distillers.Distiller.check_shapes:
        return  # nothing to check: spare tracing two models at start-up
    size, batch = int(config.image_size), int(config.batch_size)
    preact = bool(distiller.preact)
    distiller.check_shapes(abstract_feature_shapes(config.student, num_classes, size, batch, preact),
                           abstract_feature_shapes(config.teacher, num_classes, size, batch, preact))


def init_extra(distiller, tx, key, student, student_vars, teacher, teacher_vars, batch: int, dataset,
               init_heads=None):
    """``state['extra']`` for ``distiller``: heads and state sized from the models' feature shapes; CRD's memory
    banks and class tables from the training labels in dataset order (the DeviceDataset's row order, which is
    what the batch's ``indices`` refer to); FT's trained paraphraser (``init_heads``) from its init stage."""
    if not distillers.has_feature_term(distiller):
        return {}
    feats_s = feature_shapes(student, student_vars, batch, dataset.image_size, distiller.preact)
    feats_t = feature_shapes(teacher, teacher_vars, batch, dataset.image_size, distiller.preact)
    return distillers.make_extra(distiller, tx, key, feats_s, feats_t, num_train=dataset.num_train,
                                 train_labels=dataset.train_labels, init_heads=init_heads)


def run_init_stage(config, workdir, recipe, distiller, student, teacher, teacher_vars, state, prepare, data, mesh,
                   run_key, meta):
    """The two-stage distillers' init stage (``kdjax.train.init_stage``) in ``<workdir>/init_stage``, resumed
    from its own checkpoints; returns ``fit``'s output (its final ``state``: student variables and heads)."""
    batch, size = int(config.batch_size), data.image_size
    student_vars = {"params": state["params"], "batch_stats": state["batch_stats"]}
    feats_s = feature_shapes(student, student_vars, batch, size, distiller.preact)
    feats_t = feature_shapes(teacher, teacher_vars, batch, size, distiller.preact)
    stage_key = jax.random.fold_in(run_key, init_stage.INIT_STAGE_KEY)
    heads = distiller.init_stage_heads(jax.random.fold_in(stage_key, 0), feats_s, feats_t)
    stage_recipe = init_stage.make_init_recipe(config, recipe, distiller, config.student, state["params"], heads)
    trainee = loop.Trainee(
        name="distill:init", state=init_stage.init_stage_state(stage_recipe.tx, state, heads),
        step_fn=init_stage.make_init_step(student, config.student, teacher, stage_recipe.tx, prepare, distiller),
        teacher_vars=teacher_vars, eval_model=student, meta=dict(meta, stage="init"), run_key=stage_key)
    # the student is evaluated once, at the stage's end (its per-epoch accuracy is not what the stage trains)
    bookkeeping = {"eval_every": stage_recipe.epochs, "checkpoint_every": config.checkpoint_every,
                   "keep_checkpoints": config.keep_checkpoints, "eval_batch_size": config.eval_batch_size}
    out = loop.fit(init_stage.init_stage_dir(workdir), bookkeeping, stage_recipe, trainee, data, mesh)
    out["record"] = {"epochs": stage_recipe.epochs, "lr": stage_recipe.base_lr,
                     "trains": ["heads"] + (["student feature modules"] if distiller.init_trains_student else []),
                     "train_loss": init_stage.last_epoch_train_loss(init_stage.init_stage_dir(workdir),
                                                                    stage_recipe.epochs),
                     "test_loss": out["test_loss"], "top1": out["top1"], "compile_s": out["compile_s"],
                     "images_per_s": out["images_per_s"]}
    return out


def validate(config) -> None:
    """Every name and combination is checked here, before data loading or compiling."""
    if config.teacher != NO_TEACHER:
        models.check_name(config.teacher)
    models.check_name(config.student)
    augment.check_name(config.aug)
    common.validate_run(config, config.student, *([] if config.teacher == NO_TEACHER else [config.teacher]))
    # the original's spellings (correlation, attention, ...) become the canonical name, which the workdir's
    # recorded config and the results then carry
    config.distiller = distillers.canonical(config.distiller)
    distiller = make_distiller(config)  # option names and values
    if logit_stand(config):
        distillers.check_logit_stand(distiller)
    if config.teacher == NO_TEACHER and distiller.needs_teacher:
        what = "logits" if distiller.replaces_kl else "features"
        raise ValueError(f"distiller={config.distiller} distils a teacher's {what}: set teacher= and "
                         "--config.teacher_checkpoint, or use distiller=kd with teacher=none")
    if config.teacher == NO_TEACHER and logit_stand(config):
        raise ValueError("loss.logit_stand standardises a teacher's logits: set teacher= and "
                         "--config.teacher_checkpoint, or unset loss.logit_stand with teacher=none")
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
    if config.teacher != NO_TEACHER:  # the teacher's dataset and size, where the config leaves them unset
        teacher_meta = read_meta(config.teacher_checkpoint)
        common.resolve_data(config, teacher_meta)
        check_feature_shapes(config, make_distiller(config), int(teacher_meta.get("num_classes", 10)))
    return common.run_once("distill", workdir, config, _train)


def _train(config, workdir):
    teacher_vars, teacher_meta = (None, None)
    if config.teacher != NO_TEACHER:
        teacher_vars, teacher_meta, _ = common.load_checkpoint(config.teacher_checkpoint, config.teacher, "teacher")
    common.resolve_data(config, teacher_meta)
    started = time.time()
    cache_before = common.start_compilation_cache(config)
    dataset = common.load_dataset(config)
    if teacher_meta is not None:
        common.check_against_dataset(teacher_meta, config.teacher_checkpoint, dataset)
        if teacher_meta.get("dataset") not in (None, dataset.name):
            print(f"warning: teacher {config.teacher} was trained on {teacher_meta.get('dataset')}, the student "
                  f"on {dataset.name}", file=sys.stderr, flush=True)
    mesh = parallel.make_mesh()
    recipe = recipe_lib.make_recipe(config, dataset.num_train, mesh.size, config.student)  # batch vs dataset
    inputs = {} if teacher_meta is None else {"teacher": common.input_record(config.teacher_checkpoint, teacher_meta)}
    workdir_lib.claim(workdir, config, inputs=inputs)  # after every check that can refuse the launch
    dtype = common.compute_dtype(config.dtype)
    batch = int(config.batch_size)
    student = models.create(config.student, dataset.num_classes, dataset.image_size, dtype)
    teacher = (models.create(config.teacher, dataset.num_classes, dataset.image_size, dtype)
               if teacher_vars is not None else None)
    scheme = augment.create(config.aug, dataset_stats=dataset, per_sample=bool(config.augment.per_sample),
                            mix_n_run=int(config.augment.mix_n_run),
                            n_pick=config.augment.n_pick if config.augment.n_pick is not None else batch,
                            criterion=config.augment.criterion)
    distiller = make_distiller(config)
    weights = kd_weights(config, distiller)
    prepare = steps.make_prepare(dataset.mean, dataset.std, transforms.default_pad(dataset.image_size))
    step_fn = steps.make_kd_step(student, teacher, recipe.tx, prepare, scheme, weights, dataset.num_classes,
                                 distiller=distiller, steps_per_epoch=recipe.plan.steps_per_epoch)
    run_key = jax.random.key(int(config.seed))
    state = common.init_state(student, recipe.tx, jax.random.fold_in(run_key, 0), dataset.image_size)
    meta = common.model_meta(config.student, dataset, {"teacher": config.teacher, "aug": config.aug})
    data = DeviceDataset.create(dataset, mesh)
    stage, init_heads = None, None
    if distiller.init_stage and int(distiller.init_epochs) > 0:
        stage = run_init_stage(config, workdir, recipe, distiller, student, teacher, teacher_vars, state, prepare,
                               data, mesh, run_key, meta)
        trained = stage.pop("state")
        init_heads = trained["extra"]["params"]
        # the KD stage starts from the stage's student with a new optimiser, as the original's second SGD
        state = dict(state, params=trained["params"], batch_stats=trained["batch_stats"],
                     opt_state=recipe.tx.init(trained["params"]))
    state["extra"] = init_extra(distiller, recipe.tx, jax.random.fold_in(run_key, 3), student,
                                {"params": state["params"], "batch_stats": state["batch_stats"]}, teacher,
                                teacher_vars, batch, dataset, init_heads=init_heads)
    trainee = loop.Trainee(name="distill", step_fn=step_fn, state=state, teacher_vars=teacher_vars,
                           eval_model=student, meta=meta, run_key=run_key)
    out = dict(loop.fit(workdir, config, recipe, trainee, data, mesh), cache_before=cache_before)
    if stage is not None:
        out["compile_s"] += stage["compile_s"]
    fields = {"task": "distill", "teacher": config.teacher, "student": config.student, "dataset": dataset.name,
              "aug": config.aug, "distiller": config.distiller, "logit_stand": weights.logit_stand,
              "loss_weights": {"gamma": weights.gamma, "alpha": weights.alpha, "beta": weights.beta},
              **({} if stage is None else {"init_stage": stage["record"]}),
              "inputs": {} if teacher_meta is None else {
                  "teacher": common.input_record(config.teacher_checkpoint, teacher_meta)}}
    return common.finish_training(workdir, config, fields, out, recipe, started,
                                  f"{config.teacher}->{config.student} {config.aug}")

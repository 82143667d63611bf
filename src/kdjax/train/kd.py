"""A KD student run assembled once from its config: the library half of ``kdjax distill``, which the task, the
benchmarks and the tests all build the same way.

Three objects, in the order a run needs them:

* ``KDMethod.from_config(config)``: the distiller with its options, the loss weights and logit standardisation,
  resolved and checked from the config alone (no data, no checkpoint). ``validate(config)`` returns it after every
  distill-specific check, so a launch is refused before anything is loaded; the run then uses that same object:
  the distiller is built once per run.
* ``DistillSpec.from_config(config, method)``: the run as the checks resolved it (the method, the student's
  ``TrainingSpec``, the teacher, the scheme's options, the pair's recipe); the run reads it, never the config.
* ``KDSetup.create(spec, dataset, ...)``: the spec plus what needs the data: the scheme, the base
  transform (``prepare``), the student and teacher modules. It builds the step (``make_step``), the initial
  student state with the distiller's heads and state (``initial_state``, running the two-stage methods' init stage
  first), and ``train_student`` runs it all through ``loop.fit``.
"""
import dataclasses
import sys
from typing import Any, Callable, Dict, Optional, Union

import jax
import numpy as np

from kdjax import augment, distillers, models, parallel, runlog
from kdjax.augment import switch as augment_switch
from kdjax.checkpoint import inputs as checkpoint_inputs
from kdjax.configs import recipes
from kdjax.distillers import ctkd as ctkd_lib, sample_weights
from kdjax.train import init_stage, loop, recipe as recipe_lib, steps

NO_TEACHER = "none"


def set_by_config(config) -> dict:
    """What the config sets of the options a recipe may give: the ``distill.*`` fields and ``loss.beta`` (the
    weight of the distiller's term, which a recipe gives as ``beta``, e.g. ReviewKD's per-pair weight)."""
    options = config.get("distill")
    options = options.to_dict() if options is not None else {}
    return {**options, "beta": config.loss.get("beta")}


@dataclasses.dataclass(frozen=True)
class KDMethod:
    """The loss of a KD run: the distiller (with its options) and the weights of CE, the logit block and the
    distiller's term."""
    distiller: distillers.Distiller
    weights: steps.KDWeights
    recipe: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the pair's official values it uses
    recipe_line: Optional[str] = None   # the line naming them and their source; None when the pair has none

    @classmethod
    def from_config(cls, config) -> "KDMethod":
        """The configured distiller (an option it does not have fails with the list of its valid options) and the
        weights: the distiller's defaults for the scheme (``distillers.resolve_weights``: 0.1 / 0.9 / 0 for plain
        KD, the paper's; 0.1 / 9 with logit standardisation), replaced by every weight the config sets."""
        # the pair's official recipe (``kdjax.configs.recipes``), every option the config sets replacing it
        pair = (distillers.canonical(config.distiller), config.teacher, config.student)
        set_options = set_by_config(config)
        distiller = distillers.create(config.distiller, **recipes.with_recipe(*pair, set_options))
        lr_set = config.optim.get("lr") is not None
        recipe = {**recipes.applied(*pair, set_options), **recipes.solver_applied(*pair, lr_set)}
        recipe_line = recipes.describe_run(*pair, set_options, lr_set, int(config.epochs))
        loss = config.loss
        logit_stand = bool(loss.get("logit_stand", False))
        w = distillers.resolve_weights(distiller, config.aug, gamma=loss.gamma, alpha=loss.alpha, beta=loss.beta,
                                       logit_stand=logit_stand)
        weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"],
                                  temperature=float(loss.temperature), lw_mix=tuple(float(v) for v in loss.lw_mix),
                                  logit_stand=logit_stand,
                                  ls_temperature=float(loss.get("ls_temperature", distillers.LS_TEMPERATURE)),
                                  sample_weights=str(loss.get("sample_weights") or "none"),
                                  ctkd=ctkd_lib.from_config(config.get("ctkd")))
        return cls(distiller, weights, recipe=recipe, recipe_line=recipe_line)


def has_teacher(config) -> bool:
    return config.teacher != NO_TEACHER


def validate(config) -> KDMethod:
    """Every name and combination of a distill config, before data loading or compiling; returns the run's
    ``KDMethod``. The original's distiller spellings (correlation, attention, ...) become the canonical name,
    which the workdir's recorded config and the results then carry. An unset ``teacher`` is the architecture
    its checkpoint names."""
    checkpoint_inputs.fill_model_field(config, "teacher", "teacher_checkpoint")
    if has_teacher(config):
        models.check_name(config.teacher)
    models.check_name(config.student)
    augment.check_name(config.aug)
    recipe_lib.validate_run(config, config.student, *([config.teacher] if has_teacher(config) else []))
    config.distiller = distillers.canonical(config.distiller)
    method = KDMethod.from_config(config)
    distiller = method.distiller
    ctkd_lib.check_ctkd(method.weights.ctkd, distiller, method.weights.logit_stand, method.weights.sample_weights)
    if method.weights.logit_stand:
        distillers.check_logit_stand(distiller)
    sample_weights.check_sample_weights(method.weights.sample_weights, distiller)
    if not has_teacher(config):
        if distiller.needs_teacher:
            what = "logits" if distiller.replaces_kl else "features"
            raise ValueError(f"distiller={config.distiller} distils a teacher's {what}: set teacher= and "
                             "--config.teacher_checkpoint, or use distiller=kd with teacher=none")
        if method.weights.logit_stand:
            raise ValueError("loss.logit_stand standardises a teacher's logits: set teacher= and "
                             "--config.teacher_checkpoint, or unset loss.logit_stand with teacher=none")
        if method.weights.ctkd is not None:
            raise ValueError("ctkd.mode learns the temperature of the teacher's softened logits and needs a teacher: "
                             "set teacher= and --config.teacher_checkpoint, or unset ctkd.mode")
        if config.aug == "cutmix_pick_t":
            raise ValueError("aug=cutmix_pick_t scores by teacher entropy and needs a teacher: set teacher= and "
                             "--config.teacher_checkpoint")
    elif not config.teacher_checkpoint:
        raise ValueError(f"teacher={config.teacher} needs --config.teacher_checkpoint=DIR (a workdir of "
                         f"configs/teacher.py, or a checkpoint written by configs/import_torch.py); or teacher=none")
    lw = tuple(config.loss.lw_mix)
    if len(lw) != 3:
        raise ValueError(f"loss.lw_mix needs three weights [KL(x), mixed CE(x'), KL(x')], got {lw}")
    return method


def check_feature_shapes(config, distiller, num_classes: int) -> None:
    """A distiller that cannot pair these two models' features (FSP's equal channels) fails here, in one line,
    before any data is loaded."""
    if not has_teacher(config) or type(distiller).check_shapes is distillers.Distiller.check_shapes:
        return  # nothing to check: spare tracing two models at start-up
    size, batch, preact = int(config.image_size), int(config.batch_size), bool(distiller.preact)
    teacher_preact = preact or bool(distiller.teacher_preact)
    distiller.check_shapes(models.abstract_feature_shapes(config.student, num_classes, size, batch, preact),
                           models.abstract_feature_shapes(config.teacher, num_classes, size, batch, teacher_preact))


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """A distill run as its checks resolved it from the config, passed on as data: the run below the task reads
    this, never the config."""
    method: KDMethod
    training: recipe_lib.TrainingSpec   # the student's: model, seed, dtype, schedule, bookkeeping
    teacher: str                        # NO_TEACHER: the student learns from the labels only
    aug: str
    augment: Dict[str, Any]             # the scheme's options (``augment.create``'s keywords)
    scheme_switch: bool = False         # the step of every switchable scheme as one program (augment.switch)

    @property
    def student(self) -> str:
        return self.training.model

    @property
    def recipe(self) -> Dict[str, Any]:
        """The pair's official values this run uses (``configs.recipes``)."""
        return self.method.recipe

    @property
    def recipe_line(self) -> Optional[str]:
        return self.method.recipe_line

    @property
    def has_teacher(self) -> bool:
        return self.teacher != NO_TEACHER

    @classmethod
    def from_config(cls, config, method: KDMethod) -> "DistillSpec":
        """The spec of a config that ``validate`` checked and whose dataset fields are filled."""
        training = recipe_lib.training_spec(config, config.student)
        if "optim.lr" in method.recipe:  # the pair's official solver lr (``configs.recipes.solver_applied``)
            training = dataclasses.replace(training, base_lr=float(method.recipe["optim.lr"]))
        return cls(method=method, training=training, teacher=config.teacher, aug=config.aug,
                   augment=augment.options_from_config(config.get("augment"), training.batch_size),
                   scheme_switch=bool(config.get("scheme_switch")))


@dataclasses.dataclass(frozen=True)
class KDSetup:
    """A KD run's static parts: the method, the scheme (or the switch that runs it), the base transform and the
    two modules."""
    method: KDMethod
    scheme: Union[augment.Scheme, augment_switch.SchemeSwitch]
    prepare: Callable
    student: Any
    teacher: Optional[Any]
    student_name: str
    num_classes: int
    image_size: int
    batch: int

    @property
    def distiller(self) -> distillers.Distiller:
        return self.method.distiller

    @classmethod
    def create(cls, spec: DistillSpec, dataset, with_teacher: bool) -> "KDSetup":
        dtype = recipe_lib.compute_dtype(spec.training.dtype)
        create = lambda name: augment.create(name, dataset_stats=dataset, **spec.augment)  # noqa: E731
        switched = spec.scheme_switch and parallel.switches_schemes()
        switch = augment_switch.make_switch(create, spec.aug) if switched else None
        scheme = create(spec.aug) if switch is None else switch
        module = lambda name: models.create(name, dataset.num_classes, dataset.image_size, dtype)  # noqa: E731
        return cls(method=spec.method, scheme=scheme,
                   prepare=steps.prepare_for(dataset),
                   student=module(spec.student), teacher=module(spec.teacher) if with_teacher else None,
                   student_name=spec.student, num_classes=int(dataset.num_classes),
                   image_size=int(dataset.image_size), batch=spec.training.batch_size)

    @property
    def step_data(self) -> Dict[str, Any]:
        """What the step reads as data (``loop.Trainee.step_data``): a switch's index of the run's scheme."""
        if isinstance(self.scheme, augment_switch.SchemeSwitch):
            return {"scheme": np.int32(self.scheme.index)}
        return {}

    def make_step(self, recipe: recipe_lib.Recipe) -> Callable:
        return steps.make_kd_step(self.student, self.teacher, recipe.tx, self.prepare, self.scheme,
                                  self.method.weights, self.num_classes, distiller=self.distiller,
                                  steps_per_epoch=recipe.plan.steps_per_epoch)

    def feature_shapes(self, student_vars, teacher_vars):
        """The student's and the teacher's feature shapes, as the distiller asks for them (``preact``,
        ``teacher_preact``)."""
        preact = self.distiller.preact
        teacher_preact = preact or self.distiller.teacher_preact
        return (models.feature_shapes(self.student, student_vars, self.batch, self.image_size, preact),
                models.feature_shapes(self.teacher, teacher_vars, self.batch, self.image_size, teacher_preact))

    def init_extra(self, tx, key, student_vars, teacher_vars, num_train: int, train_labels, init_heads=None):
        """``state['extra']``: the distiller's heads and state sized from the models' feature shapes; CRD's memory
        banks and class tables from the training labels in dataset order (the rows the batch's ``indices`` refer
        to); FT's trained paraphraser (``init_heads``) from its init stage."""
        extra = {}
        if distillers.has_feature_term(self.distiller):
            feats_s, feats_t = self.feature_shapes(student_vars, teacher_vars)
            extra = distillers.make_extra(self.distiller, tx, key, feats_s, feats_t, num_train=num_train,
                                          train_labels=train_labels, init_heads=init_heads)
        if self.method.weights.ctkd is not None:  # CTKD's temperature parameter, updated by the student's tx
            t_params = ctkd_lib.init_params()
            extra = dict(extra, ctkd={"params": t_params, "opt_state": tx.init(t_params), "state": {}})
        return extra


def run_init_stage(setup: KDSetup, training: recipe_lib.TrainingSpec, workdir: str, recipe, state, teacher_vars,
                   data, mesh, run_key, meta):
    """The two-stage distillers' init stage (``kdjax.train.init_stage``) in ``<workdir>/init_stage``, resumed
    from its own checkpoints; returns ``fit``'s output (its final ``state``: student variables and heads) with its
    ``record`` for results.json."""
    distiller = setup.distiller
    student_vars = {"params": state["params"], "batch_stats": state["batch_stats"]}
    feats_s, feats_t = setup.feature_shapes(student_vars, teacher_vars)
    stage_key = jax.random.fold_in(run_key, init_stage.INIT_STAGE_KEY)
    heads = distiller.init_stage_heads(jax.random.fold_in(stage_key, 0), feats_s, feats_t)
    stage_recipe = init_stage.make_init_recipe(recipe, distiller, setup.student_name, state["params"], heads)
    trainee = loop.Trainee(
        name="distill:init", state=init_stage.init_stage_state(stage_recipe.tx, state, heads),
        step_fn=init_stage.make_init_step(setup.student, setup.student_name, setup.teacher, stage_recipe.tx,
                                          setup.prepare, distiller),
        teacher_vars=teacher_vars, eval_model=setup.student, meta=dict(meta, stage="init"), run_key=stage_key,
        dtype=training.dtype)
    # the student is evaluated once, at the stage's end (its per-epoch accuracy is not what the stage trains); the
    # stage saves at its epoch ends only
    bookkeeping = dataclasses.replace(training.bookkeeping, eval_every=stage_recipe.epochs,
                                      checkpoint_every_steps=None)
    stage_dir = init_stage.init_stage_dir(workdir)
    out = loop.fit(stage_dir, bookkeeping, stage_recipe, trainee, data, mesh)
    out["record"] = {"epochs": stage_recipe.epochs, "lr": stage_recipe.base_lr,
                     "trains": ["heads"] + (["student feature modules"] if distiller.init_trains_student else []),
                     "train_loss": init_stage.last_epoch_train_loss(stage_dir, stage_recipe.epochs),
                     "test_loss": out["test_loss"], "top1": out["top1"], "compile_s": out["compile_s"],
                     "images_per_s": out["images_per_s"]}
    return out


def train_student(spec: DistillSpec, workdir: str, dataset, data, mesh, teacher_vars) -> Dict[str, Any]:
    """Train the KD student of ``spec`` on ``data`` (``dataset`` placed on ``mesh``) in ``workdir``: the init
    stage first for a two-stage distiller, then the KD stage. Returns ``fit``'s output, with the recipe and the
    results.json fields of the method."""
    setup, training = KDSetup.create(spec, dataset, with_teacher=teacher_vars is not None), spec.training
    if spec.recipe_line:
        runlog.ProgressLog("distill").line(spec.recipe_line)
    recipe = recipe_lib.make_recipe(training, dataset.num_train, mesh.size)
    run_key = jax.random.key(training.seed)
    state = recipe_lib.init_state(setup.student, recipe.tx, jax.random.fold_in(run_key, 0), dataset.image_size)
    meta = recipe_lib.model_meta(spec.student, dataset, {"teacher": spec.teacher, "aug": spec.aug})
    distiller, stage, init_heads = setup.distiller, None, None
    if distiller.init_stage and int(distiller.init_epochs) > 0:
        stage = run_init_stage(setup, training, workdir, recipe, state, teacher_vars, data, mesh, run_key, meta)
        trained = stage.pop("state")
        init_heads = trained["extra"]["params"]
        # the KD stage starts from the stage's student with a new optimiser, as the original's second SGD
        state = dict(state, params=trained["params"], batch_stats=trained["batch_stats"],
                     opt_state=recipe.tx.init(trained["params"]))
    student_vars = {"params": state["params"], "batch_stats": state["batch_stats"]}
    state["extra"] = setup.init_extra(recipe.tx, jax.random.fold_in(run_key, 3), student_vars, teacher_vars,
                                      dataset.num_train, getattr(dataset, "train_labels", None),
                                      init_heads=init_heads)
    trainee = loop.Trainee(name="distill", step_fn=setup.make_step(recipe), state=state, teacher_vars=teacher_vars,
                           eval_model=setup.student, meta=meta, run_key=run_key, dtype=training.dtype,
                           step_data=setup.step_data)
    out = loop.fit(workdir, training.bookkeeping, recipe, trainee, data, mesh)
    weights = spec.method.weights
    out["recipe"], out["seed"] = recipe, training.seed
    out["fields"] = {"distiller": distiller.name, "logit_stand": weights.logit_stand,
                     "sample_weights": weights.sample_weights,
                     "ctkd": "none" if weights.ctkd is None else weights.ctkd.mode, "recipe": spec.recipe,
                     # the program that ran the scheme: the shared switch of seven schemes, or the scheme's own
                     "scheme_program": "switch" if setup.step_data else "own",
                     "loss_weights": {"gamma": weights.gamma, "alpha": weights.alpha, "beta": weights.beta},
                     **({} if stage is None else {"init_stage": stage["record"]})}
    return out


def warn_dataset_mismatch(teacher: str, teacher_meta, dataset) -> None:
    if teacher_meta.get("dataset") not in (None, dataset.name):
        print(f"warning: teacher {teacher} was trained on {teacher_meta.get('dataset')}, the student on "
              f"{dataset.name}", file=sys.stderr, flush=True)

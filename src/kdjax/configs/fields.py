"""The fields the task configs share, with their defaults (the paper's recipe) and one line of help each.

A field that is "not set" is a placeholder (``None``), never a sentinel such as ``0`` or ``""``: ``image_size``
unset means the dataset's own size, ``data_dir`` unset means ``$KDJAX_DATA_DIR`` or ``~/tensorflow_datasets``.
"""
import ml_collections
from ml_collections import config_dict

# Top-level run fields of the training tasks (teacher, distill) with their defaults.
RUN_FIELDS = dict(
    dataset="cifar100",
    epochs=240,
    epoch_factor=1,
    batch_size=64,
    seed=0,
    eval_every=1,
    checkpoint_every=10,
    checkpoint_every_steps=config_dict.placeholder(int),
    keep_checkpoints=2,
    steps_per_dispatch=100,
    last_batch="keep",
    dtype="float32",
    image_size=config_dict.placeholder(int),
    data_dir=config_dict.placeholder(str),
    manual_dir=config_dict.placeholder(str),
    placement=config_dict.placeholder(str),
    verify=config_dict.placeholder(str),
    eval_batch_size=500,
    compile_cache_dir=config_dict.placeholder(str),
)

DATA_FIELDS = ("dataset", "image_size", "data_dir", "manual_dir", "placement", "verify")


def dataset_options() -> ml_collections.ConfigDict:
    """Extra arguments of the data source (those of ``synthetic``; a user source reads the ones it knows)."""
    return ml_collections.ConfigDict(dict(
        num_classes=config_dict.placeholder(int),
        num_train=config_dict.placeholder(int),
        num_test=config_dict.placeholder(int),
        seed=config_dict.placeholder(int),
    ))


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=config_dict.placeholder(float),
        momentum=0.9,
        weight_decay=5e-4,
        decay_fractions=config_dict.placeholder(tuple),
        decay_epochs=config_dict.placeholder(tuple),
        decay_rate=0.1,
    ))


def from_checkpoint(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``dataset`` and ``image_size`` unset: a task that reads a checkpoint takes them from the checkpoint's meta
    (the dataset it was trained on, at its image size), so "not set" is not the default cifar100."""
    with config.unlocked():
        config.dataset = config_dict.placeholder(str)
        config.image_size = config_dict.placeholder(int)
    return config


def run_fields(*names) -> dict:
    """A subset of ``RUN_FIELDS`` (placeholders copied, so configs never share a reference)."""
    out = {}
    for name in names:
        value = RUN_FIELDS[name]
        out[name] = config_dict.placeholder(value.get_type()) if isinstance(value, config_dict.FieldReference) \
            else value
    return out


def training_config(task: str, **fields) -> ml_collections.ConfigDict:
    """The config of a training task: ``fields``, the run fields, the dataset options and the optimiser."""
    config = ml_collections.ConfigDict(dict(task=task, **fields, **run_fields(*RUN_FIELDS)))
    config.dataset_options = dataset_options()
    config.optim = optim_config()
    return config


# One line of help per field name (dotted for nested ones); `kdjax <task> --help` prints them with the defaults.
HELP = {
    "task": "the task this config runs (kdjax.tasks.<task>)",
    "model": "architecture (a zoo name, see `kdjax.models.names()`)",
    "teacher": "teacher architecture (a zoo name; unset: the one teacher_checkpoint names; 'none' in distill trains "
               "on labels only)",
    "student": "student architecture (a zoo name)",
    "dataset": "data source: cifar100, cifar10, tiny_imagenet, svhn, digits, synthetic, imagenet or imagenet100 "
               "(streamed from the records of kdjax prepare_data under data_dir), or a registered one (tasks that "
               "read a checkpoint: unset takes the checkpoint's)",
    "teacher_checkpoint": "the teacher: a kdjax workdir (its latest step) or one step's directory",
    "student_checkpoint": "the fixed student that scores CutMixPick (S. ent.) in tstddev",
    "checkpoint": "the checkpoint to evaluate: a workdir or one step's directory",
    "epochs": "training epochs (x epoch_factor)",
    "epoch_factor": "the original's --epoch_factor: epochs and decay milestones x k (k=4: 960 epochs)",
    "batch_size": "global batch size (a multiple of the device count)",
    "seed": "the run's random seed",
    "eval_every": "epochs between test evaluations (the last epoch is always evaluated)",
    "checkpoint_every": "epochs between checkpoints (the last epoch is always saved)",
    "checkpoint_every_steps": "streamed datasets (imagenet, imagenet100): also a checkpoint every N steps, inside "
                              "epochs (a resumed run continues from it exactly); unset: epoch ends only",
    "keep_checkpoints": "checkpoints kept per run (>= 1)",
    "steps_per_dispatch": "train steps per compiled dispatch on accelerators (one on CPU)",
    "steps_per_forward": "T. stddev steps whose batches share one teacher forward",
    "last_batch": "the short last batch: 'keep' (the original's drop_last=False) or 'drop'",
    "dtype": "compute dtype: float32 or bfloat16 (parameters and BatchNorm statistics stay float32)",
    "image_size": "image side in pixels; unset: the dataset's own size (any source can be resized); imagenet: "
                  "the RandomResizedCrop / CenterCrop size (unset: 224)",
    "data_dir": "TFDS data_dir; unset: $KDJAX_DATA_DIR or ~/tensorflow_datasets",
    "manual_dir": "where the official archives (cifar-100-python.tar.gz, ...) are put for offline preparation",
    "placement": "where the data lives: 'device' (in device memory), 'streamed' (prepared records read per step: "
                 "imagenet, imagenet100); unset: auto, by dataset (docs/data.md, 'Placement')",
    "verify": "streamed datasets: re-hash the shards 'changed' since their digest last matched (unset) or 'always'",
    "eval_batch_size": "test batch size",
    "scheme_switch": "compile the KD step of Identity, Flip, Crop+Flip, Cutout, AutoAugment, Mixup and CutMix as "
                     "one program that picks the run's scheme by data (the same values), so that runs of different "
                     "schemes share it through compile_cache_dir (on CPU; accelerators keep the scheme's own); "
                     "unset: the run's scheme alone, on in a sweep of three or more of them",
    "compile_cache_dir": "JAX's persistent compilation cache (per device kind below it); unset: none, in a "
                         "sweep <workdir>/compile_cache",
    "dataset_options": "extra arguments of the data source",
    "dataset_options.num_classes": "synthetic: number of classes (10)",
    "dataset_options.num_train": "synthetic: training examples (1024)",
    "dataset_options.num_test": "synthetic: test examples (256)",
    "dataset_options.seed": "synthetic: seed of the random pixels (0)",
    "optim": "the optimiser (SGD with momentum, coupled weight decay, step decay)",
    "optim.lr": "learning rate; unset: 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2",
    "optim.momentum": "SGD momentum",
    "optim.weight_decay": "coupled weight decay on every parameter",
    "optim.decay_fractions": "milestones as fractions of the run; unset: 150/240, 180/240, 210/240 (the paper's)",
    "optim.decay_epochs": "absolute milestones instead (x epoch_factor), e.g. 150,180,210; not with decay_fractions",
    "optim.decay_rate": "lr factor at each milestone",
    "loss": "weights of the KD loss",
    "loss.gamma": "CE weight; unset: 0.1 for KD (the paper), the distiller's own otherwise",
    "loss.alpha": "weight of the KL block; unset: 0.9 for KD",
    "loss.beta": "weight of the distiller's loss; unset: the method's",
    "loss.temperature": "KD temperature",
    "loss.lw_mix": "weights of KL on x, mixed-label CE on x', KL on x'",
    "distill": "options of the distiller (unset: the method's default)",
    "loss.logit_stand": "logit standardisation (z-scored logits) for the kd / dkd terms; CE and scores unchanged",
    "loss.ls_temperature": "base temperature of the standardised logits (2)",
    "loss.sample_weights": "'entropy': EA-KD's per-sample weights on the kd / dkd terms (teacher and student "
                           "entropy); unset: none",
    "augment": "options of the augmentation schemes",
    "num_classes": "classes of the imported checkpoint",
    "workers": "processes that prepare the shards; unset: every core",
    "classes": "prepare_data: a class subset of your own (wnids, comma-separated) instead of the dataset's list",
    "records_per_shard": "images per record shard; unset: the module's default",
    "source": "the original's .pth (or a .safetensors) checkpoint to import, or a teacher archive "
              "(cifar_teachers.tar, a directory of <model>_vanilla/ckpt_epoch_240.pth): every teacher -> workdir/<model>",
    "results_dir": "directory of results.json files to report on; unset: the workdir",
    "error_bars": "error bars in the plots (T. stddev: jackknife s.e. with one seed, else std over seeds; student "
                  "loss: std over seeds)",
    "fit_line": "draw the least-squares line in the plots",
    "num_images": "gallery columns; also the batch the schemes see",
    "per_sample": "each image gets its own draw (the original draws once per batch)",
    "output": "file name of the gallery PNG in the workdir",
    "pairs": "teacher:student pairs, comma-separated on the command line",
    "augs": "schemes of the sweep ('all' = the nine)",
    "distillers": "distillers of the sweep's students, e.g. kd,crd,crd+kd (+kd: the '+KD' variant; crd_kd after the "
                  "colon); kd's runs keep the layout <teacher>-<student>/..., others go under <distiller>/",
    "seeds": "seeds of every student and T. stddev run",
    "datasets": "datasets of the sweep",
    "optional_datasets": "datasets used only when their data is present here",
    "teacher_checkpoints": "trained teachers by model (--config.teacher_checkpoints.resnet56=DIR); others are trained",
    "teacher_dir": "a directory of imported teachers (<dir>/<model>/, kdjax import_torch of an archive): used for "
                   "every model it holds that teacher_checkpoints does not name",
    "teacher_epochs": "epochs of the teachers the sweep trains",
    "tstddev_epochs": "epochs of the T. stddev runs (10, the original's)",
    "parallel": "runs at a time, each in its own process sharing the devices (1: one after another, in process)",
    "report": "write the report after the runs",
    "verbose": "also print the original code's per-epoch 'Check T prob' lines",
    "note_skipped": "say when aug=all leaves out CutMixPick (S. ent.) for want of a student",
    "executor": "where the sweep's runs run: local (this machine) or slurm (one SLURM job per run, docs/slurm.md)",
    "action": "run (submit or run what is missing), status (where each run stands), cancel (scancel the sweep's jobs)",
    "dry_run": "print the runs (executor=slurm: the jobs and their dependencies) that would start; start nothing",
    "max_retries": "times a failed run is started again (by the next sweep command, slurm.wait, or a shard)",
    "shard": "i/n: this process is shard i of n sharing the workdir, each taking the next free run (docs/slurm.md)",
    "poll_s": "seconds between looks at the queue (slurm.wait) or at the other shards' progress",
    "slurm": "sbatch settings of executor=slurm (unset ones are left to the cluster's defaults)",
    "slurm.partition": "sbatch --partition; unset: the cluster's default partition",
    "slurm.time": "sbatch --time in minutes; a job that reaches it is requeued and resumes from its checkpoint",
    "slurm.gpus_per_node": "sbatch --gpus-per-node (0: none, for CPU partitions)",
    "slurm.cpus_per_task": "sbatch --cpus-per-task",
    "slurm.mem_gb": "sbatch --mem in GB; unset: the partition's default",
    "slurm.qos": "sbatch --qos",
    "slurm.account": "sbatch --account",
    "slurm.constraint": "sbatch --constraint (node features, e.g. a100)",
    "slurm.array_parallelism": "at most this many jobs of one job array run at a time (--array=...%N)",
    "slurm.setup": "shell lines run in each job before kdjax (e.g. module load cuda, source venv/bin/activate)",
    "slurm.additional_parameters": "other sbatch options, key=value or a flag, e.g. reservation=r1,exclusive",
    "slurm.python": "the Python that runs kdjax on the nodes; unset: this one (sys.executable)",
    "slurm.job_name": "job name prefix (jobs are <prefix>-<task>)",
    "slurm.max_timeouts": "times a job that reaches its time limit is requeued to resume",
    "slurm.wait": "stay until every job ended, resubmitting failed runs, then write the report",
    "slurm.check_shared_fs": "refuse a workdir on a filesystem local to this host when the jobs run elsewhere",
}


def help_for(path: str) -> str:
    """The help line of a dotted field name; fields of the teacher_checkpoints group share one; the lines that
    list names (distillers, schemes) and the distiller options come from the registries."""
    from kdjax import augment, distillers
    if path.startswith("teacher_checkpoints."):
        return f"trained {path.split('.', 1)[1]} teacher (workdir or step directory)"
    if path.startswith("distill."):
        return distillers.option_help(path.split(".", 1)[1])
    if path.startswith("augment."):
        return augment.option_help(path.split(".", 1)[1])
    if path.startswith("ctkd."):
        from kdjax.distillers import ctkd
        return ctkd.option_help(path.split(".", 1)[1])
    if path == "distiller":
        return f"loss beside or instead of KD: {', '.join(distillers.names())} (kd: plain KD)"
    if path == "aug":
        return f"augmentation scheme: {', '.join(augment.names())} ('all' = the paper's nine, tstddev and gallery)"
    return HELP.get(path, "")

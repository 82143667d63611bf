"""The paper's grid: teacher/student pairs x schemes x seeds, the T. stddev runs, and the report.

    kdjax sweep --workdir=runs/paper
    kdjax sweep --config.pairs=resnet56:resnet20 --config.augs=cutmix,cutmix_pick_t --config.seeds=0 \
        --config.teacher_checkpoints.resnet56=runs/t_resnet56 --workdir=runs/small
    kdjax sweep --config.distillers=kd,crd,crd+kd --workdir=runs/methods   # methods x schemes, one report

``distillers`` adds a student per distiller (``+kd``: the "+KD" variant, ``distill.with_kd``); teachers and
T. stddev runs are shared, and the report groups the correlations by distiller.

``optional_datasets`` are used only when their data is present (the default adds Tiny-ImageNet that way).
Teachers not given in ``teacher_checkpoints`` are trained first.
"""
import ml_collections
from ml_collections import config_dict

from kdjax import augment, models
from kdjax.configs import fields
from kdjax.configs.parse import apply_arg

# The paper's nine pairs.
PAPER_PAIRS = ("vgg13:vgg8", "vgg13:MobileNetV2", "resnet56:resnet20", "resnet56:ShuffleV2", "wrn_40_2:wrn_16_2",
               "wrn_40_2:vgg8", "resnet32x4:resnet8x4", "resnet32x4:ShuffleV2", "ResNet50:vgg8")

# Fields every run of the sweep inherits from the sweep's config; training runs also get TRAIN_FIELDS.
COMMON_FIELDS = ("batch_size", "dtype", "image_size", "data_dir", "manual_dir", "compile_cache_dir")
TRAIN_FIELDS = ("steps_per_dispatch", "last_batch", "eval_every", "epoch_factor", "checkpoint_every")
EXECUTORS = ("local", "slurm")
ACTIONS = ("run", "status", "cancel")


def slurm_options() -> ml_collections.ConfigDict:
    """sbatch settings of ``executor=slurm`` (``kdjax.sweep.slurm``); unset ones are left to the cluster."""
    return ml_collections.ConfigDict(dict(
        partition=config_dict.placeholder(str),
        time=1440,                       # minutes per job; a job that reaches it is requeued and resumes
        gpus_per_node=1,
        cpus_per_task=4,
        mem_gb=config_dict.placeholder(float),
        qos=config_dict.placeholder(str),
        account=config_dict.placeholder(str),
        constraint=config_dict.placeholder(str),
        array_parallelism=64,
        setup=config_dict.placeholder(tuple),
        additional_parameters=config_dict.placeholder(tuple),
        python=config_dict.placeholder(str),
        job_name="kdjax",
        max_timeouts=20,
        wait=False,
        check_shared_fs=True,
    ))


def sweep_config(**fields_) -> ml_collections.ConfigDict:
    """A sweep's config: ``fields_`` over the sweep defaults (one teacher_checkpoints field per zoo model)."""
    defaults = dict(task="sweep", pairs=PAPER_PAIRS, augs=augment.PAPER_SCHEMES, distillers=("kd",), seeds=(0,),
                    datasets=("cifar100",),
                    optional_datasets=(), epochs=240, teacher_epochs=240, tstddev_epochs=10, parallel=1,
                    report=True, executor="local", action="run", dry_run=False, max_retries=2,
                    shard=config_dict.placeholder(str), poll_s=10.0,
                    **fields.run_fields(*COMMON_FIELDS, *TRAIN_FIELDS))
    for key, value in fields_.items():
        defaults[key] = value
    config = ml_collections.ConfigDict(defaults)
    config.dataset_options = fields.dataset_options()
    config.slurm = slurm_options()
    config.teacher_checkpoints = ml_collections.ConfigDict({name: config_dict.placeholder(str)
                                                            for name in models.names()})
    config.teacher_dir = config_dict.placeholder(str)  # imported teachers, <dir>/<model>/ (archive_import)
    return config




def get_config(arg=None):
    config = sweep_config(pairs=PAPER_PAIRS, seeds=(0, 1, 2), datasets=("cifar100",),
                          optional_datasets=("tiny_imagenet",), epochs=240, teacher_epochs=240,
                          **fields.run_fields("steps_per_dispatch", "last_batch", "eval_every"))
    return apply_arg(config, arg)

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
from kdjax.configs import fields
from kdjax.configs.parse import apply_arg
from kdjax.sweep.grid import PAPER_PAIRS, sweep_config


def get_config(arg=None):
    config = sweep_config(pairs=PAPER_PAIRS, seeds=(0, 1, 2), datasets=("cifar100",),
                          optional_datasets=("tiny_imagenet",), epochs=240, teacher_epochs=240,
                          **fields.run_fields("steps_per_dispatch", "last_batch", "eval_every"))
    return apply_arg(config, arg)

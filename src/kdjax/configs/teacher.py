"""Train a teacher with cross-entropy (the original's train_teacher.py recipe).

    kdjax teacher --config.model=resnet56 --config.dataset=cifar100 --workdir=runs/t_resnet56
"""
from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    return apply_arg(fields.training_config("teacher", model="resnet56"), arg)

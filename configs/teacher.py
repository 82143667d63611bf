"""Train a teacher with cross-entropy (the original's train_teacher.py recipe, SPEC section 4).

    python launch.py --config=configs/teacher.py:model=resnet56,dataset=cifar100 --workdir=runs/t_resnet56
"""
from kdjax.config_defaults import RUN_FIELDS, optim_config
from kdjax.config_util import parse_arg


def get_config(arg=None):
    config = parse_arg(arg, task="teacher", model="resnet56", **RUN_FIELDS)
    config.optim = optim_config()
    return config

"""Train a teacher with cross-entropy (the original's train_teacher.py recipe).

A copy to edit: ``kdjax --config=configs/teacher.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax teacher --help``.
"""
from kdjax.configs.teacher import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

"""Train a student by KD with one augmentation scheme (the paper's S. test loss runs).

A copy to edit: ``kdjax --config=configs/distill.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax distill --help``.
"""
from kdjax.configs.distill import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

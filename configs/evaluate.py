"""Evaluate any kdjax checkpoint on the test split: test loss, top-1, top-5.

A copy to edit: ``kdjax --config=configs/evaluate.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax evaluate --help``.
"""
from kdjax.configs.evaluate import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

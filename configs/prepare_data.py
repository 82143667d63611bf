"""Prepare a streamed dataset once: ``kdjax prepare_data --config.dataset=imagenet --config.manual_dir=DIR``.

A copy to edit: ``kdjax --config=configs/prepare_data.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax prepare_data --help``.
"""
from kdjax.configs.prepare_data import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

"""The whole paper in a few minutes on the embedded digits data (no download).

A copy to edit: ``kdjax --config=configs/demo.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax demo --help``.
"""
from kdjax.configs.demo import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

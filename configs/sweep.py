"""The paper's grid: teacher/student pairs x schemes x seeds, the T. stddev runs, and the report.

A copy to edit: ``kdjax --config=configs/sweep.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax sweep --help``.
"""
from kdjax.configs.sweep import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

"""Report over a sweep: ``kdjax report --config.results_dir=DIR --workdir=OUT``.

A copy to edit: ``kdjax --config=configs/report.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax report --help``.
"""
from kdjax.configs.report import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

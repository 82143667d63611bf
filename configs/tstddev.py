"""T. stddev of a teacher under the nine augmentation schemes (the original's --utils.check_ce_var run).

A copy to edit: ``kdjax --config=configs/tstddev.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax tstddev --help``.
"""
from kdjax.configs.tstddev import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

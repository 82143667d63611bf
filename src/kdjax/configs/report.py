"""Report over a sweep: ``kdjax report --config.results_dir=DIR --workdir=OUT``.

Reads every results.json under ``results_dir`` (default: the workdir itself) and writes report.md, summary.csv,
tstddev.csv, correlations.csv and plots/*.png into the workdir.
"""
import ml_collections
from ml_collections import config_dict

from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    return apply_arg(ml_collections.ConfigDict(dict(
        task="report",
        results_dir=config_dict.placeholder(str),
        error_bars=True,
        fit_line=False,
    )), arg)

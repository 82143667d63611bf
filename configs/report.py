"""Report over a sweep: ``python launch.py --config=configs/report.py[:results_dir=DIR] --workdir=OUT``.

Reads every results.json under ``results_dir`` (default: the workdir itself) and writes report.md, summary.csv,
tstddev.csv, correlations.csv and plots/*.png into the workdir.
"""
from kdjax import config_util


def get_config(arg=None):
    return config_util.parse_arg(
        arg,
        task="report",
        results_dir="",      # '' = the workdir
        error_bars=False,    # the paper's plots show means only; True adds the std over seeds
    )

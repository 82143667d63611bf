"""The report task: tables, correlations and plots of a results tree (see kdjax.analysis)."""
import os

from absl import logging

from kdjax import analysis


def run(config, workdir: str) -> dict:
    root = os.path.abspath(os.path.expanduser(config.results_dir or workdir))
    out = analysis.write_report(root, workdir, error_bars=bool(config.get("error_bars", False)))
    paths = out["paths"]
    logging.info("report over %d results files in %s: %s, %s, %d plots", out["num_records"], root,
                 paths["markdown"], paths["summary_csv"], len(paths["plots"]))
    for pair in out["summary"]["pairs"]:
        if pair["correlations"]:
            logging.info("%s: %s", analysis.pair_title(pair),
                         analysis.format_coefficients(pair["correlations"], sep="; "))
    return out

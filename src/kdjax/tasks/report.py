"""Task 'report': tables, correlations and plots of a results tree (``kdjax.sweep.analysis``)."""
import os

from kdjax.sweep import analysis


def run(config, workdir: str) -> dict:
    root = os.path.abspath(os.path.expanduser(config.results_dir or workdir))
    out = analysis.write_report(root, workdir, error_bars=bool(config.get("error_bars", True)),
                                fit_line=bool(config.get("fit_line", False)))
    paths = out["paths"]
    print(f"[report] {out['num_records']} results files in {root}: {paths['markdown']}, {paths['summary_csv']}, "
          f"{len(paths['plots'])} plot(s)", flush=True)
    for pair in out["summary"]["pairs"]:
        if pair["correlations"]:
            print(f"[report] {analysis.pair_title(pair)}: "
                  f"{analysis.format_coefficients(pair['correlations'], sep='; ')}", flush=True)
    return out

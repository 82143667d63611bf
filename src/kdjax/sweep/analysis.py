"""The paper's analysis: tables over seeds, T. stddev vs S. test loss correlations, scatter plots (docs/fidelity.md, "Correlation analysis").

Input is a tree of ``results.json`` files, one per run (any depth; the sweep writes KD runs to
``<teacher>-<student>/<aug>/seed<k>/``, other distillers' to ``<distiller>/<teacher>-<student>/<aug>/seed<k>/``,
and T. stddev runs to ``tstddev/<teacher>/<aug>/seed<k>/``). Only the fields inside the files matter, never the
directory names, so trees may be merged or rearranged freely.

Per (teacher, student, dataset, distiller) every scheme gives one point: x = the teacher's T. stddev under that
scheme (mean over seeds), y = the student's final test loss (mean over seeds). The distiller is the run's
``distiller`` with ``+kd`` for a "+KD" variant (``distill.with_kd`` in its recorded config), e.g. ``crd+kd``; each
trains with its own loss, so its students are compared only among themselves, and the tables and plots are
grouped by distiller (``kd`` first). The T. stddev of a scheme depends only on the teacher, except for CutMixPick
(S. ent.), where the student picks the samples: there the runs measured with the pair's own student are
preferred, and runs with another (or no recorded) student are used only when none exists, which the tables flag.
Coefficients are scipy's pearsonr, spearmanr and kendalltau with their defaults (kendall tau-b; exact two-sided
p-values for 9 points without ties), which reproduce the published numbers.

Beside T. stddev, the T. stddev runs record teacher-side metrics on the augmented data (``TEACHER_METRICS``, see
``kdjax.tstddev.teacher_metrics``): each gets its per-scheme value in the tables and its own correlation with the
same S. test losses, over the schemes that carry it (at least 3), next to T. stddev's. Results written before these
metrics existed simply lack them: their columns stay empty and the report leaves their section out.

All functions are pure except ``scatter_plot`` and ``write_report``, which write files.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Iterable, Sequence

import numpy as np
import scipy.stats

from kdjax import augment
from kdjax.sweep.grid import distiller_label

# The plots' colours, one per scheme of the paper in its order (kdjax.augment.PAPER_SCHEMES).
PAPER_COLOURS = ("blue", "red", "black", "green", "cyan", "orange", "magenta", "lightskyblue", "olive")
SCHEME_COLOURS = dict(zip(augment.PAPER_SCHEMES, PAPER_COLOURS))
DATASET_LABELS = {"cifar100": "CIFAR100", "cifar10": "CIFAR10", "tiny_imagenet": "Tiny ImageNet",
                  "digits": "Digits", "synthetic": "Synthetic"}
METRICS = ("test_loss", "top1", "top5", "best_top1")
# One marker per scheme of the paper, so that schemes stay apart without the legend (and without colour).
PAPER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")
SCHEME_MARKERS = dict(zip(augment.PAPER_SCHEMES, PAPER_MARKERS))
FULL_RUN_EPOCHS = 240  # the paper's schedule, x epoch_factor
# The teacher-side metrics of a T. stddev run correlated with the S. test loss beside T. stddev: results field ->
# label. Agreement exists only where a student scored the pool (CutMixPick S. ent.), so it rarely has 3 schemes.
TEACHER_METRICS = {"ece": "ECE (x')", "class_histogram_entropy": "class-histogram entropy",
                   "agreement": "S-T agreement"}


def scheme_label(aug: str) -> str:
    return augment.label(aug)


def scheme_order(aug: str) -> tuple:
    """Sort key: the paper's order first, then any other scheme by name."""
    order = augment.PAPER_SCHEMES
    return (order.index(aug), "") if aug in order else (len(order), aug)


# ----------------------------------------------------------------------------------------------------------------
# Reading the results tree


def collect_results(root: str) -> list[dict]:
    """Every ``results.json`` under ``root`` (sorted by path), each with its path added as ``_path``."""
    if not os.path.isdir(root):
        raise ValueError(f"results directory {root!r} does not exist; pass the sweep's workdir (results_dir=...)")
    records = []
    from kdjax.sweep.executor import is_set_aside
    for dirpath, dirnames, filenames in os.walk(root):
        # a rerun's old outputs (<run>.stale-N) are kept, but they are not a seed of their own
        dirnames[:] = sorted(d for d in dirnames if not is_set_aside(d))
        if "results.json" not in filenames:
            continue
        path = os.path.join(dirpath, "results.json")
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}; fix or delete the file") from e
        if not isinstance(record, dict) or "task" not in record:
            raise ValueError(f"{path} is not a kdjax results file (a JSON object with a 'task' field)")
        record["_path"] = path
        records.append(record)
    return records


def _teacher_of(record: dict):
    return record.get("teacher", record.get("model"))


def _check_fields(record: dict) -> None:
    """The fields the tables are keyed on; a run missing one would otherwise vanish from them silently."""
    need = {"distill": ("teacher", "student", "aug"), "tstddev": ("aug",)}.get(record.get("task"), ())
    missing = [f for f in need if record.get(f) is None]
    if record.get("task") == "tstddev" and _teacher_of(record) is None:
        missing.append("teacher (or model)")
    if missing:
        where = record.get("_path", "a results record")
        raise ValueError(f"{where} (task {record['task']!r}) lacks {', '.join(missing)}; rewrite it with these fields")


def distiller_of(record: dict) -> str:
    """``kd``, ``crd``, ``crd+kd``, ``dkd+ctkd``: the run's distiller, with ``+kd`` when its config set
    ``distill.with_kd`` and ``+ctkd`` when it set ``ctkd.mode`` (a record without a distiller, from before there
    were several, is ``kd``)."""
    name = record.get("distiller") or "kd"
    config = record.get("config") or {}
    with_kd = name != "kd" and bool((config.get("distill") or {}).get("with_kd"))
    ctkd = (config.get("ctkd") or {}).get("mode") not in (None, "none")
    return distiller_label(name, with_kd, ctkd)


def distiller_order(name: str) -> tuple:
    """Sort key of distillers: kd first, then by name (a "+KD" variant right after its distiller)."""
    return (name != "kd", name)


def _is_distill(record: dict) -> bool:
    return record.get("task") == "distill" and record.get("test_loss") is not None


def _is_tstddev(record: dict) -> bool:
    return record.get("task") == "tstddev" and record.get("tstddev") is not None


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) over seeds; the std is NaN for a single seed, both are NaN for none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def correlations(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson, Spearman and Kendall (tau-b) coefficients with their two-sided p-values, scipy's defaults."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    out = {"n": int(x.size)}
    if x.size < 3:
        raise ValueError(f"correlations need at least 3 points, got {x.size}")
    with warnings.catch_warnings():
        # Constant input gives NaN coefficients; the tables show them as such.
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        for name, fn in (("pearson", scipy.stats.pearsonr), ("spearman", scipy.stats.spearmanr),
                         ("kendall", scipy.stats.kendalltau)):
            res = fn(x, y)
            out[name], out[f"{name}_p"] = float(res.statistic), float(res.pvalue)
    return out


def format_coefficients(corr: dict, sep: str = "\n") -> str:
    """'Pearson: 0.9742 (p = 0.00%)' etc.: coefficients to 4 decimals, p-values in percent, as the paper."""
    return sep.join(f"{name.capitalize()}: {corr[name]:.4f} (p = {100 * corr[name + '_p']:.2f}%)"
                    for name in ("pearson", "spearman", "kendall"))


def summarize(records: Sequence[dict]) -> dict:
    """Tables from run records.

    Returns a dict with
      ``runs``: one row per (teacher, student, dataset, distiller, aug) of KD runs: mean/std/n over seeds of
        test_loss, top1, top5, and the T. stddev assigned to that scheme (x of the plots);
      ``tstddev``: one row per (teacher, student or '', dataset, aug) of T. stddev runs;
      ``pairs``: one entry per (teacher, student, dataset, distiller) with its plotted points (schemes having both
        x and y) and, for 3 points or more, its correlations.
    """
    distill, tstd = {}, {}
    for r in records:
        _check_fields(r)
        if _is_distill(r):
            key = (r["teacher"], r["student"], r.get("dataset", "cifar100"), distiller_of(r), r["aug"])
            distill.setdefault(key, []).append(r)
        elif _is_tstddev(r):
            key = (_teacher_of(r), r.get("student") or "", r.get("dataset", "cifar100"), r["aug"])
            tstd.setdefault(key, []).append(r)

    tstddev_rows = []
    for (teacher, student, dataset, aug), runs in sorted(
            tstd.items(), key=lambda kv: (*kv[0][:3], scheme_order(kv[0][3]))):
        row = {"teacher": teacher, "student": student, "dataset": dataset, "aug": aug, "label": scheme_label(aug)}
        for field in ("tstddev", "tstddev_se", "mean_entropy", *TEACHER_METRICS, "aug_top1"):
            row[f"{field}_mean"], row[f"{field}_std"], row[f"{field}_n"] = mean_std(r.get(field) for r in runs)
        row["seeds"] = sorted(r.get("seed") for r in runs if r.get("seed") is not None)
        tstddev_rows.append(row)

    run_rows = []
    for (teacher, student, dataset, distiller, aug), runs in sorted(  # grouped by distiller, then by pair
            distill.items(), key=lambda kv: (distiller_order(kv[0][3]), *kv[0][:3], scheme_order(kv[0][4]))):
        row = {"teacher": teacher, "student": student, "dataset": dataset, "distiller": distiller, "aug": aug,
               "label": scheme_label(aug)}
        for field in METRICS:
            row[f"{field}_mean"], row[f"{field}_std"], row[f"{field}_n"] = mean_std(r.get(field) for r in runs)
        row["seeds"] = sorted(r.get("seed") for r in runs if r.get("seed") is not None)
        x_runs, x_student = _tstddev_runs_for(tstd, teacher, student, dataset, aug)
        row["tstddev_mean"], row["tstddev_std"], row["tstddev_n"] = mean_std(r["tstddev"] for r in x_runs)
        row["tstddev_se"] = mean_std(r.get("tstddev_se") for r in x_runs)[0]
        row["tstddev_student"] = x_student
        for field in TEACHER_METRICS:  # from the same runs as x
            row[f"{field}_mean"], row[f"{field}_std"], row[f"{field}_n"] = mean_std(r.get(field) for r in x_runs)
        row["epochs"] = sorted({int(r["epochs"]) for r in runs if r.get("epochs") is not None})
        row["epoch_factor"] = max([int((r.get("config") or {}).get("epoch_factor") or 1) for r in runs] or [1])
        row["image_size"] = sorted({(r.get("config") or {}).get("image_size") for r in runs} - {None})
        run_rows.append(row)

    pairs = {}
    for row in run_rows:
        key = (row["teacher"], row["student"], row["dataset"], row["distiller"])
        pair = pairs.setdefault(key, {"teacher": key[0], "student": key[1], "dataset": key[2],
                                      "distiller": key[3], "points": []})
        if row["tstddev_n"] and row["test_loss_n"]:
            # x error: the std over seeds when there are several, else the run's own jackknife s.e.
            x_err = row["tstddev_std"] if row["tstddev_n"] > 1 else row["tstddev_se"]
            pair["points"].append({"aug": row["aug"], "label": row["label"], "x": row["tstddev_mean"],
                                   "y": row["test_loss_mean"], "x_std": x_err, "y_std": row["test_loss_std"],
                                   "x_err_kind": "std over seeds" if row["tstddev_n"] > 1 else "jackknife s.e."})
    teachers = {(r.get("model"), r.get("dataset", "cifar100")): r for r in records if r.get("task") == "teacher"}
    for pair in pairs.values():
        rows = [r for r in run_rows if (r["teacher"], r["student"], r["dataset"], r["distiller"]) == (
            pair["teacher"], pair["student"], pair["dataset"], pair["distiller"])]
        trained = teachers.get((pair["teacher"], pair["dataset"]))
        pair["provenance"] = {
            "epochs": sorted({e for r in rows for e in r["epochs"]}),
            "full_epochs": FULL_RUN_EPOCHS * max([r["epoch_factor"] for r in rows] or [1]),
            "seeds": sorted({s for r in rows for s in r["seeds"]}),
            "image_size": sorted({s for r in rows for s in r["image_size"]}),
            "teacher_top1": None if trained is None else trained.get("top1")}
        pts = pair["points"]
        pair["correlations"] = (correlations([p["x"] for p in pts], [p["y"] for p in pts])
                                if len(pts) >= 3 else None)
        pair["metric_correlations"] = {field: metric_correlation(rows, field) for field in TEACHER_METRICS}
    return {"runs": run_rows, "tstddev": tstddev_rows, "pairs": list(pairs.values())}


def metric_points(rows: Sequence[dict], field: str) -> list[tuple[float, float]]:
    """(metric, S. test loss), means over seeds, of the schemes among one pair's ``rows`` that have both."""
    return [(r[f"{field}_mean"], r["test_loss_mean"]) for r in rows if r["test_loss_n"] and r.get(f"{field}_n")]


def metric_correlation(rows: Sequence[dict], field: str) -> dict | None:
    """The correlation of a teacher-side metric with the S. test loss over ``metric_points``; None below 3."""
    points = metric_points(rows, field)
    if len(points) < 3:
        return None
    x, y = zip(*points)
    return correlations(x, y)


def has_teacher_metrics(summary: dict) -> bool:
    """Whether any T. stddev run of the summary carries a teacher-side metric (results from before they existed
    do not, and their report is left as it was)."""
    return any(row.get(f"{field}_n") for row in summary["tstddev"] for field in TEACHER_METRICS)


def _tstddev_runs_for(tstd: dict, teacher, student, dataset, aug) -> tuple[list, str]:
    """The T. stddev runs that give x for one scheme of one pair, and which student measured them.

    The returned student is '' when none needs to be named, the pair's student when matched, and
    'other:<names>' when a student-dependent scheme had to fall back to runs of other students.
    """
    candidates = {s: runs for (t, s, d, a), runs in tstd.items() if (t, d, a) == (teacher, dataset, aug)}
    if aug in augment.names() and augment.scorer_of(aug) == "student":
        if student in candidates:
            return candidates[student], student
        others = sorted(candidates)
        return [r for s in others for r in candidates[s]], ("other:" + "+".join(s or "none" for s in others)
                                                            if others else "")
    return [r for s in sorted(candidates) for r in candidates[s]], ""


# ----------------------------------------------------------------------------------------------------------------
# Output


def pair_title(pair: dict) -> str:
    dataset = DATASET_LABELS.get(pair["dataset"], pair["dataset"])
    extra = "" if pair["distiller"] == "kd" else f" ({pair['distiller'].upper()})"
    return f"{pair['teacher']}/{pair['student']}, {dataset}{extra}"


def pair_slug(pair: dict) -> str:
    extra = "" if pair["distiller"] == "kd" else f"_{pair['distiller'].replace('+', '_')}"  # crd+kd: _crd_kd
    return f"{pair['teacher']}-{pair['student']}_{pair['dataset']}{extra}"


def error_caption(points: Sequence[dict]) -> str:
    kinds = sorted({p.get("x_err_kind", "std over seeds") for p in points})
    return (f"error bars: T. stddev ± {' / '.join(kinds)}; S. test loss ± std over seeds (none with one seed)")


def scatter_plot(points: Sequence[dict], title: str, path: str, corr: dict | None = None,
                 error_bars: bool = True, fit_line: bool = False) -> str:
    """The paper's figure: one marker per scheme (x = T. stddev, y = S. test loss), legend, coefficients box;
    error bars (``error_caption`` says which) and, with ``fit_line``, the least-squares line.

    ``points``: dicts with aug, x, y (and x_std, y_std for ``error_bars``). Writes a PNG to ``path``.
    """
    # An Agg canvas on a bare Figure, not pyplot: no display is needed, and the global backend of an
    # interactive session calling this function is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for p in sorted(points, key=lambda p: scheme_order(p["aug"])):
        colour = SCHEME_COLOURS.get(p["aug"], "grey")
        if error_bars and (np.isfinite(p.get("x_std", np.nan)) or np.isfinite(p.get("y_std", np.nan))):
            ax.errorbar(p["x"], p["y"], xerr=_finite_or_none(p.get("x_std")),
                        yerr=_finite_or_none(p.get("y_std")), fmt="none", ecolor=colour, alpha=0.5, lw=1)
        ax.scatter(p["x"], p["y"], s=70, c=colour, marker=SCHEME_MARKERS.get(p["aug"], "o"), edgecolors="black",
                   linewidths=0.6, label=scheme_label(p["aug"]), zorder=3)
    if fit_line and len(points) >= 2:
        xs, ys = np.asarray([p["x"] for p in points]), np.asarray([p["y"] for p in points])
        slope, intercept = np.polyfit(xs, ys, 1)
        grid = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(grid, slope * grid + intercept, ls="--", lw=1, color="grey", zorder=2, label="least squares")
    ax.set_xlabel("T. stddev")
    ax.set_ylabel("S. test loss")
    ax.set_title(title)
    if error_bars:
        ax.text(0.0, -0.2, error_caption(points), transform=ax.transAxes, fontsize=7, va="top", ha="left")
    ax.grid(True, ls=":", lw=0.5)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.margins(0.08)
    # Legend and coefficients sit to the right of the axes, so that they never hide a point.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if corr is not None:
        ax.text(1.02, 0.0, format_coefficients(corr), transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
                bbox=dict(boxstyle="round", facecolor="white", edgecolor="grey"))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _finite_or_none(v):
    return v if v is not None and np.isfinite(v) else None


def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if np.isfinite(std) else "")


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return v


def _write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c, "")) for c in columns])


RUN_COLUMNS = ("teacher", "student", "dataset", "distiller", "aug", "label", "seeds",
               "test_loss_mean", "test_loss_std", "test_loss_n", "top1_mean", "top1_std", "top1_n",
               "top5_mean", "top5_std", "top5_n", "best_top1_mean", "best_top1_std", "best_top1_n", "tstddev_mean",
               "tstddev_std", "tstddev_n", "tstddev_se", "tstddev_student",
               *(f"{field}_{stat}" for field in TEACHER_METRICS for stat in ("mean", "std")))
TSTDDEV_COLUMNS = ("teacher", "student", "dataset", "aug", "label", "seeds", "tstddev_mean", "tstddev_std",
                   "tstddev_n", "tstddev_se_mean", "mean_entropy_mean", "mean_entropy_std",
                   *(f"{field}_{stat}" for field in (*TEACHER_METRICS, "aug_top1") for stat in ("mean", "std")))
CORRELATION_COLUMNS = ("teacher", "student", "dataset", "distiller", "n", "pearson", "pearson_p", "spearman",
                       "spearman_p", "kendall", "kendall_p")
# metric_correlations.csv: T. stddev's and each teacher-side metric's correlation, one row per pair and metric
METRIC_CORRELATION_COLUMNS = CORRELATION_COLUMNS[:4] + ("metric",) + CORRELATION_COLUMNS[4:]


def _provenance(pair: dict) -> list:
    p = pair["provenance"]
    epochs = ", ".join(map(str, p["epochs"])) or "?"
    size = ", ".join(f"{s}px" for s in p["image_size"]) or "the dataset's own size"
    teacher = "not in these results" if p["teacher_top1"] is None else f"{p['teacher_top1']:.4f}"
    lines = [f"Computed from: {DATASET_LABELS.get(pair['dataset'], pair['dataset'])} at {size}; students trained "
             f"{epochs} epochs; seeds {', '.join(map(str, p['seeds'])) or '?'}; teacher top-1 {teacher}."]
    if p["epochs"] and max(p["epochs"]) < p["full_epochs"]:
        lines.append(f"Caveat: these runs are shorter than the paper's {p['full_epochs']} epochs, so their "
                     f"correlation is illustrative, not a reproduction.")
    return lines + [""]


def _pair_rows(summary: dict, pair: dict) -> list[dict]:
    return [row for row in summary["runs"] if (row["teacher"], row["student"], row["dataset"], row["distiller"]) == (
        pair["teacher"], pair["student"], pair["dataset"], pair["distiller"])]


def metric_correlation_records(summary: dict) -> list[dict]:
    """metric_correlations.csv: per pair, T. stddev's correlation and each teacher-side metric's (where defined)."""
    records = []
    for pair in summary["pairs"]:
        key = {k: pair[k] for k in ("teacher", "student", "dataset", "distiller")}
        for field, corr in (("tstddev", pair["correlations"]), *pair["metric_correlations"].items()):
            if corr:
                records.append({**key, "metric": field, **corr})
    return records


def _coefficient_cells(corr: dict | None) -> list[str]:
    return ([f"{corr[k]:.4f} ({100 * corr[k + '_p']:.2f}%)" for k in ("pearson", "spearman", "kendall")]
            if corr else ["–"] * 3)


def _teacher_metrics_section(summary: dict) -> list[str]:
    lines = ["## Teacher-side metrics vs S. test loss", "",
             "Each metric of the teacher on the augmented data x' (from the T. stddev runs, mean over seeds) against "
             "the S. test loss, over the schemes of a pair that carry it, next to T. stddev's coefficients. ECE: 15 "
             "equal-width confidence bins, a mixed image labelled by its larger part; class-histogram entropy: of "
             "the teacher's argmax classes (natural log); S-T agreement: the share of x' where the scoring "
             "student's argmax is the teacher's (CutMixPick S. ent. only).", "",
             "| pair | dataset | distiller | metric | schemes | Pearson (p) | Spearman (p) | Kendall (p) |",
             "|---|---|---|---|---|---|---|---|"]
    for pair in summary["pairs"]:
        rows = _pair_rows(summary, pair)
        entries = [("T. stddev", len(pair["points"]), pair["correlations"])] + [
            (label, len(metric_points(rows, field)), pair["metric_correlations"][field])
            for field, label in TEACHER_METRICS.items()]
        for label, count, corr in entries:
            lines.append(f"| {pair['teacher']}/{pair['student']} | {pair['dataset']} | {pair['distiller']} | "
                         f"{label} | {count} | " + " | ".join(_coefficient_cells(corr)) + " |")
    return lines + [""]


def _metric_cells(row: dict) -> str:
    """The teacher-side metric cells of a table row (ECE and entropy to 6 decimals, agreement to 4)."""
    return "".join(f" {_fmt(row[f'{field}_mean'], row[f'{field}_std'], 4 if field == 'agreement' else 6)} |"
                   for field in TEACHER_METRICS)


def _markdown(summary: dict, plot_paths: dict, out_dir: str, root: str) -> str:
    where = os.path.relpath(root, out_dir)
    lines = ["# T. stddev vs S. test loss", "",
             f"Results from `{where}` (relative to this report). Mean ± std over seeds (sample std, ddof 1). "
             "Coefficients: scipy pearsonr / spearmanr / kendalltau (tau-b), two-sided p-values in percent. "
             "T. stddev s.e. is the jackknife standard error of one run (mean over seeds).", ""]
    pairs = summary["pairs"]
    metrics = has_teacher_metrics(summary)
    metric_header = "".join(f" {label} |" for label in TEACHER_METRICS.values())
    metric_rule = "---|" * len(TEACHER_METRICS)
    names = sorted({p["distiller"] for p in pairs}, key=distiller_order)
    if len(names) > 1:
        lines += [f"Distillers: {', '.join(names)}. Each trains its students with its own loss, so S. test losses "
                  "and their correlations compare only within one distiller: the tables and plots are grouped by "
                  "distiller. The T. stddev of a scheme (x) is the same for every distiller.", ""]
    if pairs:
        lines += ["## Correlations", "", "| pair | dataset | distiller | schemes | Pearson (p) | Spearman (p) | "
                  "Kendall (p) |", "|---|---|---|---|---|---|---|"]
        for pair in pairs:
            cells = _coefficient_cells(pair["correlations"])
            lines.append(f"| {pair['teacher']}/{pair['student']} | {pair['dataset']} | {pair['distiller']} | "
                         f"{len(pair['points'])} | " + " | ".join(cells) + " |")
        lines.append("")
        if metrics:
            lines += _teacher_metrics_section(summary)
    for pair in pairs:
        lines += [f"## {pair_title(pair)}", ""] + _provenance(pair) + [
                  "| scheme | T. stddev | T. stddev seeds | S. test loss | top-1 (last) | top-1 (best) | top-5 | "
                  "student seeds |" + (metric_header if metrics else ""),
                  "|---|---|---|---|---|---|---|---|" + (metric_rule if metrics else "")]
        for row in _pair_rows(summary, pair):
            fallback = row["tstddev_student"].startswith("other:")
            flag = f" (measured with {row['tstddev_student'][6:]})" if fallback else ""
            lines.append(f"| {row['label']} | {_fmt(row['tstddev_mean'], row['tstddev_std'], 6)}{flag} | "
                         f"{row['tstddev_n']} | {_fmt(row['test_loss_mean'], row['test_loss_std'], 4)} | "
                         f"{_fmt(row['top1_mean'], row['top1_std'], 4)} | "
                         f"{_fmt(row['best_top1_mean'], row['best_top1_std'], 4)} | "
                         f"{_fmt(row['top5_mean'], row['top5_std'], 4)} | {row['test_loss_n']} |"
                         + (_metric_cells(row) if metrics else ""))
        if pair["correlations"]:
            lines += ["", format_coefficients(pair["correlations"], sep="; ")]
        key = pair_slug(pair)
        if key in plot_paths:
            lines += ["", f"![{pair_title(pair)}]({os.path.relpath(plot_paths[key], out_dir)})", "",
                      error_caption(pair["points"]).capitalize() + "."]
        lines.append("")
    if summary["tstddev"]:
        lines += ["## T. stddev runs", "", "| teacher | student | dataset | scheme | T. stddev | seeds | "
                  "T. stddev s.e. | mean entropy |" + (metric_header + " T. top-1 (x') |" if metrics else ""),
                  "|---|---|---|---|---|---|---|---|" + (metric_rule + "---|" if metrics else "")]
        for row in summary["tstddev"]:
            extra = (_metric_cells(row) + f" {_fmt(row['aug_top1_mean'], row['aug_top1_std'], 4)} |"
                     if metrics else "")
            lines.append(f"| {row['teacher']} | {row['student'] or '–'} | {row['dataset']} | {row['label']} | "
                         f"{_fmt(row['tstddev_mean'], row['tstddev_std'], 6)} | {row['tstddev_n']} | "
                         f"{_fmt(row['tstddev_se_mean'], math.nan, 6)} | "
                         f"{_fmt(row['mean_entropy_mean'], row['mean_entropy_std'], 4)} |" + extra)
        lines.append("")
    if not pairs and not summary["tstddev"]:
        lines += ["No distillation or T. stddev results were found.", ""]
    return "\n".join(lines)


def write_report(root: str, out_dir: str, error_bars: bool = True, fit_line: bool = False) -> dict:
    """Read every results.json under ``root``; write to ``out_dir``: report.md, summary.csv (KD runs per scheme
    with their x), tstddev.csv, correlations.csv, metric_correlations.csv (T. stddev's and the teacher-side metrics'
    coefficients, one row per pair and metric) and plots/<teacher>-<student>_<dataset>[_<distiller>].png (no
    suffix for kd; crd+kd: _crd_kd). Returns the paths and the summary."""
    records = collect_results(root)
    summary = summarize(records)
    os.makedirs(out_dir, exist_ok=True)
    plot_paths = {}
    for pair in summary["pairs"]:
        if len(pair["points"]) >= 1:
            path = os.path.join(out_dir, "plots", pair_slug(pair) + ".png")
            plot_paths[pair_slug(pair)] = scatter_plot(pair["points"], pair_title(pair), path,
                                                       pair["correlations"], error_bars=error_bars,
                                                       fit_line=fit_line)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "summary_csv": os.path.join(out_dir, "summary.csv"),
             "tstddev_csv": os.path.join(out_dir, "tstddev.csv"),
             "correlations_csv": os.path.join(out_dir, "correlations.csv"),
             "metric_correlations_csv": os.path.join(out_dir, "metric_correlations.csv"), "plots": plot_paths}
    _write_csv(paths["summary_csv"], summary["runs"], RUN_COLUMNS)
    _write_csv(paths["tstddev_csv"], summary["tstddev"], TSTDDEV_COLUMNS)
    _write_csv(paths["correlations_csv"],
               [{**{k: p[k] for k in ("teacher", "student", "dataset", "distiller")}, **p["correlations"]}
                for p in summary["pairs"] if p["correlations"]], CORRELATION_COLUMNS)
    _write_csv(paths["metric_correlations_csv"], metric_correlation_records(summary), METRIC_CORRELATION_COLUMNS)
    with open(paths["markdown"], "w") as f:
        f.write(_markdown(summary, plot_paths, out_dir, root))
    return {"paths": paths, "summary": summary, "num_records": len(records)}

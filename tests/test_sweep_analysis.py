"""The correlation analysis against the paper's published points, and the report task on a fabricated sweep."""
import csv
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from kdjax import augment
from kdjax.sweep import analysis

REPO = pathlib.Path(__file__).resolve().parents[1]
AUGS = list(augment.PAPER_SCHEMES)
PAIRS = [("vgg13", "vgg8"), ("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"), ("ResNet50", "vgg8")]

# The published numbers (docs/fidelity.md, "Published numbers"): T. stddev / S. test loss per scheme (rows, in AUGS order) and pair (columns, in PAIRS order),
# then the printed Pearson / Spearman / Kendall and their p-values in percent.
PUBLISHED = {
    "cifar100": """
        .005519 / 1.1856 | .005248 / 1.1783 | .005473 / 1.0976 | .005530 / 1.2418
        .005516 / 1.1754 | .005232 / 1.1668 | .005471 / 1.0774 | .005532 / 1.2110
        .005457 / 1.1537 | .005121 / 1.1763 | .005410 / 1.0837 | .005494 / 1.1976
        .005295 / 1.1279 | .004983 / 1.1687 | .005255 / 1.0564 | .005370 / 1.1925
        .005176 / 1.1273 | .004904 / 1.1478 | .005110 / 1.0305 | .005248 / 1.1443
        .005075 / 1.1194 | .004719 / 1.1621 | .004988 / 1.0486 | .005083 / 1.1188
        .004665 / 1.0862 | .004443 / 1.1440 | .004719 / 1.0275 | .004870 / 1.1161
        .004300 / 1.0605 | .004039 / 1.1269 | .004400 / 1.0054 | .004656 / 1.0851
        .004042 / 0.9981 | .003788 / 1.0924 | .004154 / 0.9746 | .004397 / 1.0069
        .9742 / 1.0 / 1.0 | .9404 / .9333 / .8333 | .9581 / .9667 / .8889 | .9697 / .9833 / .9444
        0.00 / 0.00 / 0.00 | 0.02 / 0.02 / 0.09 | 0.00 / 0.00 / 0.02 | 0.00 / 0.00 / 0.00
    """,
    "tiny_imagenet": """
        .003873 / 1.8377 | .002994 / 1.9459 | .003482 / 1.7676 | .003903 / 1.9767
        .003873 / 1.8379 | .002978 / 1.9352 | .003473 / 1.7567 | .003901 / 1.9674
        .003808 / 1.8346 | .002893 / 1.9343 | .003385 / 1.7599 | .003860 / 1.9249
        .003734 / 1.7932 | .002845 / 1.9369 | .003305 / 1.7587 | .003773 / 1.9091
        .003284 / 1.7310 | .002610 / 1.9569 | .002953 / 1.7358 | .003332 / 1.7750
        .003388 / 1.7757 | .002593 / 1.9201 | .002999 / 1.7278 | .003413 / 1.8281
        .003173 / 1.7259 | .002494 / 1.9136 | .002921 / 1.7296 | .003373 / 1.8225
        .002905 / 1.6556 | .002148 / 1.8985 | .002609 / 1.6986 | .003197 / 1.7290
        .002681 / 1.6237 | .001972 / 1.8817 | .002386 / 1.6849 | .002948 / 1.6724
        .9870 / .9958 / .9860 | .8484 / .7833 / .6667 | .9831 / .9000 / .7778 | .9879 / 1.0 / 1.0
        0.00 / 0.00 / 0.02 | 0.38 / 1.25 / 1.27 | 0.00 / 0.09 / 0.24 | 0.00 / 0.00 / 0.00
    """,
}


def published_columns():
    """[(dataset, teacher, student, x[9], y[9], coefficients[3], p_percent[3])] from the tables above."""
    columns = []
    for dataset, text in PUBLISHED.items():
        rows = [[[float(v) for v in cell.split("/")] for cell in line.split("|")]
                for line in text.strip().splitlines()]
        assert len(rows) == 11 and all(len(r) == 4 for r in rows)
        for j, (teacher, student) in enumerate(PAIRS):
            points = np.array([rows[i][j] for i in range(9)])
            columns.append((dataset, teacher, student, points[:, 0], points[:, 1], rows[9][j], rows[10][j]))
    return columns


@pytest.mark.parametrize("column", published_columns(), ids=lambda c: f"{c[1]}-{c[2]}-{c[0]}")
def test_published_coefficients_are_reproduced(column):
    _, _, _, x, y, coefficients, p_percent = column
    corr = analysis.correlations(x, y)
    assert corr["n"] == 9
    for name, printed, p_printed in zip(("pearson", "spearman", "kendall"), coefficients, p_percent):
        assert round(corr[name], 4) == printed, (name, corr[name], printed)
        assert round(100 * corr[name + "_p"], 2) == p_printed, (name, corr[name + "_p"], p_printed)
    text = analysis.format_coefficients(corr)
    assert f"Pearson: {coefficients[0]:.4f} (p = {p_percent[0]:.2f}%)" in text


def test_correlations_reject_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        analysis.correlations([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        analysis.correlations([1, 2], [1, 2])


def write_result(root, rel, record):
    path = pathlib.Path(root, rel, "results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def fabricate_sweep(root, seeds=(0, 1, 2)):
    """KD and T. stddev runs around the published CIFAR-100 points of two pairs (seed noise with mean zero, so
    the means over seeds are the published points), plus the distractors the report must handle."""
    rng = np.random.default_rng(0)
    columns = {(c[1], c[2]): c for c in published_columns() if c[0] == "cifar100"}
    expected = {}
    for teacher, student in [("vgg13", "vgg8"), ("resnet56", "resnet20")]:
        _, _, _, x, y, coefficients, p_percent = columns[(teacher, student)]
        for aug, xi, yi in zip(AUGS, x, y):
            loss = yi + rng.normal(0, 0.01, len(seeds))
            loss += yi - loss.mean()
            top1 = rng.uniform(0.6, 0.75, len(seeds))
            tstd = xi + rng.normal(0, 2e-5, len(seeds))
            tstd += xi - tstd.mean()
            for k, seed in enumerate(seeds):
                write_result(root, f"{teacher}-{student}/{aug}/seed{seed}",
                             {"task": "distill", "teacher": teacher, "student": student, "dataset": "cifar100",
                              "aug": aug, "distiller": "kd", "seed": seed, "epochs": 240,
                              "test_loss": float(loss[k]), "top1": float(top1[k]), "top5": 0.9})
                student_field = {"student": student} if aug == "cutmix_pick_s" else {}
                write_result(root, f"tstddev/{teacher}/{aug}/seed{seed}" + (f"-{student}" if student_field else ""),
                             {"task": "tstddev", "teacher": teacher, **student_field, "dataset": "cifar100",
                              "aug": aug, "seed": seed, "epochs": 10, "tstddev": float(tstd[k]),
                              "tstddev_se": 1e-5, "groups": 1564, "mean_entropy": 0.5})
            expected[(teacher, student, aug)] = {"loss": loss, "top1": top1, "tstd": tstd}
        expected[(teacher, student)] = (coefficients, p_percent)
    # CutMixPick (S. ent.) measured with a different student must not replace the pair's own measurement.
    write_result(root, "tstddev/vgg13/cutmix_pick_s/seed0-other",
                 {"task": "tstddev", "teacher": "vgg13", "student": "resnet8x4", "dataset": "cifar100",
                  "aug": "cutmix_pick_s", "seed": 0, "tstddev": 0.5})
    # A teacher-training run has no place in these tables.
    write_result(root, "teachers/vgg13", {"task": "teacher", "model": "vgg13", "dataset": "cifar100", "top1": 0.7})
    return expected


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_report_outputs(out_dir, expected):
    out_dir = pathlib.Path(out_dir)
    rows = read_csv(out_dir / "summary.csv")
    assert len(rows) == 2 * 9
    for row in rows:
        e = expected[(row["teacher"], row["student"], row["aug"])]
        assert row["label"] == analysis.scheme_label(row["aug"])
        assert int(row["test_loss_n"]) == int(row["tstddev_n"]) == 3
        np.testing.assert_allclose(float(row["test_loss_mean"]), e["loss"].mean(), rtol=1e-12)
        np.testing.assert_allclose(float(row["test_loss_std"]), e["loss"].std(ddof=1), rtol=1e-12)
        np.testing.assert_allclose(float(row["top1_mean"]), e["top1"].mean(), rtol=1e-12)
        np.testing.assert_allclose(float(row["top1_std"]), e["top1"].std(ddof=1), rtol=1e-12)
        np.testing.assert_allclose(float(row["tstddev_mean"]), e["tstd"].mean(), rtol=1e-12)
        np.testing.assert_allclose(float(row["tstddev_std"]), e["tstd"].std(ddof=1), rtol=1e-12)
        assert row["tstddev_student"] == (row["student"] if row["aug"] == "cutmix_pick_s" else "")
    assert [r["aug"] for r in rows[:9]] == AUGS  # the paper's order

    corr_rows = {(r["teacher"], r["student"]): r for r in read_csv(out_dir / "correlations.csv")}
    assert len(corr_rows) == 2
    for pair, row in corr_rows.items():
        coefficients, p_percent = expected[pair]
        for name, printed, p_printed in zip(("pearson", "spearman", "kendall"), coefficients, p_percent):
            assert round(float(row[name]), 4) == printed
            assert round(100 * float(row[name + "_p"]), 2) == p_printed

    markdown = (out_dir / "report.md").read_text()
    assert "## vgg13/vgg8, CIFAR100" in markdown and "## resnet56/resnet20, CIFAR100" in markdown
    assert "Pearson: 0.9742 (p = 0.00%)" in markdown and "Kendall: 0.8333 (p = 0.09%)" in markdown
    e = expected[("vgg13", "vgg8", "identity")]
    assert f"| Identity | {e['tstd'].mean():.6f} ± {e['tstd'].std(ddof=1):.6f} | 3 |" in markdown
    assert "plots/vgg13-vgg8_cifar100.png" in markdown

    for name in ("vgg13-vgg8_cifar100.png", "resnet56-resnet20_cifar100.png"):
        png = out_dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_task_on_fabricated_sweep(tmp_path):
    from kdjax.tasks import report

    results = tmp_path / "sweep"
    expected = fabricate_sweep(results)
    out = tmp_path / "report"
    config = ConfigDict({"task": "report", "results_dir": str(results), "error_bars": False})
    result = report.run(config, str(out))
    assert result["num_records"] == 2 * 9 * 3 * 2 + 2
    check_report_outputs(out, expected)
    # The fallback to another student's CutMixPick (S. ent.) measurement is used only when no own run exists.
    rows = analysis.summarize([r for r in analysis.collect_results(str(results))
                               if not (r.get("student") == "vgg8" and r["task"] == "tstddev")])["runs"]
    cmp_s = next(r for r in rows if (r["teacher"], r["aug"]) == ("vgg13", "cutmix_pick_s"))
    assert cmp_s["tstddev_student"] == "other:resnet8x4" and cmp_s["tstddev_mean"] == 0.5


def test_launch_report_in_place(tmp_path):
    """``launch.py --config=configs/report.py --workdir=DIR`` with the results inside DIR (the default)."""
    if not (REPO / "launch.py").exists():
        pytest.skip("launch.py not present")
    expected = fabricate_sweep(tmp_path)
    subprocess.run([sys.executable, str(REPO / "launch.py"), "--config=configs/report.py",
                    f"--workdir={tmp_path}"], cwd=REPO, check=True, capture_output=True, timeout=120)
    check_report_outputs(tmp_path, expected)


def test_single_seed_and_partial_schemes(tmp_path):
    """One seed gives no std (blank in the CSV); a pair with fewer than 3 schemes gets a plot but no coefficients."""
    for aug, loss in [("identity", 1.2), ("cutmix", 1.1)]:
        write_result(tmp_path, f"a-b/{aug}/seed0", {"task": "distill", "teacher": "a", "student": "b",
                                                     "dataset": "cifar100", "aug": aug, "seed": 0,
                                                     "test_loss": loss, "top1": 0.5, "top5": 0.8})
        write_result(tmp_path, f"tstddev/a/{aug}/seed0", {"task": "tstddev", "teacher": "a", "dataset": "cifar100",
                                                           "aug": aug, "seed": 0, "tstddev": loss / 200})
    out = analysis.write_report(str(tmp_path), str(tmp_path / "out"))
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert [r["test_loss_std"] for r in rows] == ["", ""] and [float(r["test_loss_mean"]) for r in rows] == [1.2, 1.1]
    assert read_csv(tmp_path / "out" / "correlations.csv") == []
    assert out["summary"]["pairs"][0]["correlations"] is None
    assert pathlib.Path(out["paths"]["plots"]["a-b_cifar100"]).exists()


def test_collect_results_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        analysis.collect_results(str(tmp_path / "missing"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*results.json"):
        analysis.collect_results(str(tmp_path))
    (tmp_path / "x" / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="'task' field"):
        analysis.collect_results(str(tmp_path))
    (tmp_path / "x" / "results.json").write_text(json.dumps({"task": "distill", "teacher": "a", "aug": "flip",
                                                            "test_loss": 1.0}))
    with pytest.raises(ValueError, match="lacks student"):
        analysis.summarize(analysis.collect_results(str(tmp_path)))


def test_mean_std_matches_numpy():
    values = [1.0, 2.5, 4.0]
    mean, std, n = analysis.mean_std(values + [None])
    assert (mean, n) == (2.5, 3) and math.isclose(std, np.std(values, ddof=1))
    assert math.isnan(analysis.mean_std([3.0])[1]) and analysis.mean_std([])[2] == 0


def test_report_states_its_provenance_error_bars_and_unique_columns(tmp_path):
    fabricate_sweep(tmp_path / "results")
    write_result(tmp_path / "results", "teachers/vgg13", {"task": "teacher", "model": "vgg13", "dataset": "cifar100",
                                                          "top1": 0.7436, "epochs": 240})
    out = analysis.write_report(str(tmp_path / "results"), str(tmp_path / "out"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Computed from: CIFAR100 at the dataset's own size; students trained 240 epochs; seeds 0, 1, 2; " \
           "teacher top-1 0.7436." in text
    assert "Caveat" not in text  # full-length runs
    assert "Error bars: t. stddev ± std over seeds" in text or "error bars: T. stddev ± std over seeds" in text.lower()
    assert "Results from `../results`" in text  # relative to the report
    for line in text.splitlines():
        if line.startswith("| scheme |") or line.startswith("| teacher |") or line.startswith("| pair |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == len(set(cells)), line
    assert len(set(analysis.SCHEME_MARKERS.values())) == 9
    assert out["paths"]["plots"]


def test_short_runs_carry_a_caveat(tmp_path):
    fabricate_sweep(tmp_path / "results")
    for path in (tmp_path / "results").rglob("results.json"):
        record = json.loads(path.read_text())
        if record["task"] == "distill":
            path.write_text(json.dumps(dict(record, epochs=10)))
    analysis.write_report(str(tmp_path / "results"), str(tmp_path / "out"))
    assert "Caveat: these runs are shorter than the paper's 240 epochs" in (tmp_path / "out" / "report.md").read_text()


def test_distiller_of_a_record():
    assert analysis.distiller_of({"task": "distill"}) == "kd"  # results from before there were several
    assert analysis.distiller_of({"distiller": "crd", "config": {"distill": {"with_kd": None}}}) == "crd"
    assert analysis.distiller_of({"distiller": "crd", "config": {"distill": {"with_kd": True}}}) == "crd+kd"
    assert analysis.distiller_of({"distiller": "kd", "config": {"distill": {"with_kd": True}}}) == "kd"
    assert sorted(["crd+kd", "at", "kd", "crd"], key=analysis.distiller_order) == ["kd", "at", "crd", "crd+kd"]


def test_report_groups_by_distiller(tmp_path):
    """kd, crd and crd+kd students of one pair: a correlation, table and plot per distiller (kd's exactly as in a
    kd-only report), in that order; the T. stddev (x) is shared."""
    results = tmp_path / "results"
    expected = fabricate_sweep(results)
    analysis.write_report(str(results), str(tmp_path / "kd_only"))
    kd_only = (tmp_path / "kd_only" / "report.md").read_text()
    assert "Distillers:" not in kd_only
    column = next(c for c in published_columns() if c[:3] == ("cifar100", "vgg13", "vgg8"))
    y = column[4]
    losses = {"crd": y + 0.25, "crd+kd": y[::-1].copy()}  # crd+kd: the reverse order, another correlation
    for label, loss in losses.items():
        name, with_kd = label.split("+")[0], label.endswith("+kd")
        for aug, value in zip(AUGS, loss):
            write_result(results, f"{label.replace('+', '_')}/vgg13-vgg8/{aug}/seed0",
                         {"task": "distill", "teacher": "vgg13", "student": "vgg8", "dataset": "cifar100",
                          "aug": aug, "distiller": name, "seed": 0, "epochs": 240, "test_loss": float(value),
                          "top1": 0.7, "top5": 0.9, "config": {"distill": {"with_kd": with_kd or None}}})
    out = analysis.write_report(str(results), str(tmp_path / "out"))
    out_dir = tmp_path / "out"
    rows = read_csv(out_dir / "summary.csv")
    assert [(r["distiller"], r["teacher"]) for r in rows] == (
        [("kd", "resnet56")] * 9 + [("kd", "vgg13")] * 9 + [("crd", "vgg13")] * 9 + [("crd+kd", "vgg13")] * 9)
    assert [r for r in rows if r["distiller"] == "kd"] == read_csv(tmp_path / "kd_only" / "summary.csv")
    for row in rows[18:]:
        i = AUGS.index(row["aug"])
        assert float(row["test_loss_mean"]) == losses[row["distiller"]][i] and row["test_loss_n"] == "1"
        # x of each scheme is the teacher's, the same as for the kd students
        np.testing.assert_allclose(float(row["tstddev_mean"]), expected[("vgg13", "vgg8", row["aug"])]["tstd"].mean())
    corr = read_csv(out_dir / "correlations.csv")
    assert [(r["distiller"], r["teacher"]) for r in corr] == [("kd", "resnet56"), ("kd", "vgg13"), ("crd", "vgg13"),
                                                             ("crd+kd", "vgg13")]
    assert corr[:2] == read_csv(tmp_path / "kd_only" / "correlations.csv")
    tstd = [expected[("vgg13", "vgg8", aug)]["tstd"].mean() for aug in AUGS]
    for row in corr[2:]:
        want = analysis.correlations(tstd, losses[row["distiller"]])
        for name in ("pearson", "pearson_p", "spearman", "spearman_p", "kendall", "kendall_p"):
            assert float(row[name]) == want[name], (row["distiller"], name)
    assert round(float(corr[2]["pearson"]), 4) == 0.9742 and float(corr[3]["pearson"]) < 0  # shifted; reversed
    text = (out_dir / "report.md").read_text()
    assert "Distillers: kd, crd, crd+kd. Each trains its students with its own loss" in text
    titles = [line for line in text.splitlines() if line.startswith("## ") and "/" in line]
    assert titles == ["## resnet56/resnet20, CIFAR100", "## vgg13/vgg8, CIFAR100", "## vgg13/vgg8, CIFAR100 (CRD)",
                      "## vgg13/vgg8, CIFAR100 (CRD+KD)"]
    assert "| vgg13/vgg8 | cifar100 | crd+kd | 9 |" in text
    assert "plots/vgg13-vgg8_cifar100_crd_kd.png" in text
    assert sorted(out["paths"]["plots"]) == ["resnet56-resnet20_cifar100", "vgg13-vgg8_cifar100",
                                             "vgg13-vgg8_cifar100_crd", "vgg13-vgg8_cifar100_crd_kd"]
    # kd's sections read as in the kd-only report
    kd_section = text[text.index("## vgg13/vgg8, CIFAR100\n"):text.index("## vgg13/vgg8, CIFAR100 (CRD)")]
    assert kd_section in kd_only

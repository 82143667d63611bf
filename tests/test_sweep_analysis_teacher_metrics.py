"""The report's teacher-side metrics beside T. stddev (ECE, class-histogram entropy, S-T agreement): per-scheme
values in the tables and CSVs, and their correlations with the S. test loss, on hand-made results files."""
import json
import math

import numpy as np
import pytest

from kdjax.sweep import analysis
from test_sweep_analysis import AUGS, fabricate_sweep, read_csv

PAIRS = [("vgg13", "vgg8"), ("resnet56", "resnet20")]
# The columns the report wrote before the teacher-side metrics: they keep their names and places.
OLD_RUN_COLUMNS = ["teacher", "student", "dataset", "distiller", "aug", "label", "seeds", "test_loss_mean",
                   "test_loss_std", "test_loss_n", "top1_mean", "top1_std", "top1_n", "top5_mean", "top5_std", "top5_n",
                   "best_top1_mean", "best_top1_std", "best_top1_n", "tstddev_mean", "tstddev_std", "tstddev_n",
                   "tstddev_se", "tstddev_student"]
OLD_TSTDDEV_COLUMNS = ["teacher", "student", "dataset", "aug", "label", "seeds", "tstddev_mean", "tstddev_std",
                       "tstddev_n", "tstddev_se_mean", "mean_entropy_mean", "mean_entropy_std"]


def add_metrics(root):
    """Give every T. stddev run of the fabricated sweep teacher-side metrics: per teacher and scheme a known mean
    over seeds (seed noise of mean zero), agreement only where a student scored (CutMixPick S. ent.). Returns the
    per-scheme means {(teacher, aug): {field: mean}}."""
    rng = np.random.default_rng(1)
    means = {}
    paths = sorted(root.rglob("results.json"))
    for teacher in ("vgg13", "resnet56"):
        for i, aug in enumerate(AUGS):
            want = {"ece": 0.02 + 0.003 * i + (0.01 if teacher == "vgg13" else 0) * math.sin(i),
                    "class_histogram_entropy": math.log(100) - 0.01 * i ** 1.5 - 0.002 * (i % 3),
                    "aug_top1": 0.9 - 0.03 * i}
            if aug == "cutmix_pick_s":
                want["agreement"] = 0.6 + (0.1 if teacher == "vgg13" else 0.0)
            records = []
            for path in paths:
                r = json.loads(path.read_text())
                own_student = r.get("student") in (None, "vgg8", "resnet20")
                if r["task"] == "tstddev" and r.get("teacher") == teacher and r["aug"] == aug and own_student:
                    records.append((path, r))
            assert len(records) == 3
            for field, mean in want.items():
                noise = rng.normal(0, 1e-3, len(records))
                for (path, r), value in zip(records, mean + noise - noise.mean()):
                    r[field] = float(value)
            for path, r in records:
                path.write_text(json.dumps(r))
            means[(teacher, aug)] = want
    # the other student's CutMixPick (S. ent.) run: its values must not replace the pair's own
    other = root / "tstddev/vgg13/cutmix_pick_s/seed0-other/results.json"
    record = json.loads(other.read_text())
    other.write_text(json.dumps(dict(record, ece=0.9, class_histogram_entropy=0.1, agreement=0.01)))
    return means


@pytest.fixture()
def report(tmp_path):
    results = tmp_path / "results"
    fabricate_sweep(results)
    means = add_metrics(results)
    out = analysis.write_report(str(results), str(tmp_path / "out"), error_bars=False)
    return out, means, tmp_path / "out"


def test_tables_carry_each_metric_per_scheme(report):
    out, means, out_dir = report
    rows = read_csv(out_dir / "summary.csv")
    assert list(rows[0])[:len(OLD_RUN_COLUMNS)] == OLD_RUN_COLUMNS
    for row in rows:
        want = means[(row["teacher"], row["aug"])]
        for field in ("ece", "class_histogram_entropy"):
            np.testing.assert_allclose(float(row[f"{field}_mean"]), want[field], rtol=1e-12)
        if row["aug"] == "cutmix_pick_s":
            np.testing.assert_allclose(float(row["agreement_mean"]), want["agreement"], rtol=1e-12)
            assert float(row["agreement_std"]) > 0
        else:
            assert row["agreement_mean"] == ""
    tstd = read_csv(out_dir / "tstddev.csv")
    assert list(tstd[0])[:len(OLD_TSTDDEV_COLUMNS)] == OLD_TSTDDEV_COLUMNS
    identity = next(r for r in tstd if (r["teacher"], r["aug"]) == ("vgg13", "identity"))
    np.testing.assert_allclose(float(identity["aug_top1_mean"]), 0.9, rtol=1e-12)
    np.testing.assert_allclose(float(identity["ece_mean"]), means[("vgg13", "identity")]["ece"], rtol=1e-12)

    text = (out_dir / "report.md").read_text()
    row = next(r for r in out["summary"]["runs"] if (r["teacher"], r["aug"]) == ("vgg13", "cutmix_pick_s"))
    cells = (f" {row['ece_mean']:.6f} ± {row['ece_std']:.6f} | {row['class_histogram_entropy_mean']:.6f} ± "
             f"{row['class_histogram_entropy_std']:.6f} | {row['agreement_mean']:.4f} ± {row['agreement_std']:.4f} |")
    assert any(line.startswith("| CutMixPick (S. ent.) |") and line.endswith(cells) for line in text.splitlines())
    assert "| scheme | T. stddev | T. stddev seeds | S. test loss | top-1 (last) | top-1 (best) | top-5 | " \
           "student seeds | ECE (x') | class-histogram entropy | S-T agreement |" in text
    for line in text.splitlines():  # every header's cells stay distinct
        if line.startswith(("| scheme |", "| teacher |", "| pair |")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == len(set(cells)), line


def test_each_metric_is_correlated_beside_tstddev(report):
    out, means, out_dir = report
    corr_rows = read_csv(out_dir / "metric_correlations.csv")
    by_key = {(r["teacher"], r["metric"]): r for r in corr_rows}
    # agreement has one scheme per pair: no coefficients
    assert sorted(by_key) == sorted((t, m) for t, _ in PAIRS for m in ("tstddev", "ece", "class_histogram_entropy"))
    plain = {r["teacher"]: r for r in read_csv(out_dir / "correlations.csv")}
    losses = {(r["teacher"], r["aug"]): r["test_loss_mean"] for r in out["summary"]["runs"]}
    text = (out_dir / "report.md").read_text()
    assert "## Teacher-side metrics vs S. test loss" in text
    for teacher, student in PAIRS:
        y = [losses[(teacher, aug)] for aug in AUGS]
        t_row = by_key[(teacher, "tstddev")]
        assert {k: t_row[k] for k in plain[teacher]} == plain[teacher]  # T. stddev's, as correlations.csv has it
        for field in ("ece", "class_histogram_entropy"):
            want = analysis.correlations([means[(teacher, aug)][field] for aug in AUGS], y)
            got = by_key[(teacher, field)]
            assert int(got["n"]) == 9
            for name in ("pearson", "pearson_p", "spearman", "spearman_p", "kendall", "kendall_p"):
                np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-9, atol=1e-12, err_msg=name)
            label = analysis.TEACHER_METRICS[field]
            cells = " | ".join(f"{want[k]:.4f} ({100 * want[k + '_p']:.2f}%)" for k in ("pearson", "spearman",
                                                                                        "kendall"))
            assert f"| {teacher}/{student} | cifar100 | kd | {label} | 9 | {cells} |" in text
        t_cells = " | ".join(f"{float(t_row[k]):.4f} ({100 * float(t_row[k + '_p']):.2f}%)"
                             for k in ("pearson", "spearman", "kendall"))
        assert f"| {teacher}/{student} | cifar100 | kd | T. stddev | 9 | {t_cells} |" in text
        assert f"| {teacher}/{student} | cifar100 | kd | S-T agreement | 1 | – | – | – |" in text
    # the metrics' coefficients differ from T. stddev's (else the test could not tell them apart)
    assert by_key[("vgg13", "ece")]["pearson"] != by_key[("vgg13", "tstddev")]["pearson"]


def test_agreement_is_correlated_where_three_schemes_carry_it(tmp_path):
    """Hand-made: three schemes with a student-scored agreement each get a coefficient."""
    from test_sweep_analysis import write_result

    values = {"identity": (1.2, 0.8), "mixup": (1.1, 0.7), "cutmix": (1.0, 0.75)}
    for aug, (loss, agreement) in values.items():
        write_result(tmp_path, f"a-b/{aug}/seed0", {"task": "distill", "teacher": "a", "student": "b",
                                                     "dataset": "cifar100", "aug": aug, "seed": 0,
                                                     "test_loss": loss, "top1": 0.5, "top5": 0.8})
        write_result(tmp_path, f"tstddev/a/{aug}/seed0", {"task": "tstddev", "teacher": "a", "dataset": "cifar100",
                                                           "aug": aug, "seed": 0, "tstddev": loss / 200,
                                                           "agreement": agreement})
    out = analysis.write_report(str(tmp_path), str(tmp_path / "out"))
    corr = out["summary"]["pairs"][0]["metric_correlations"]
    assert corr["ece"] is None and corr["class_histogram_entropy"] is None
    want = analysis.correlations([0.8, 0.7, 0.75], [1.2, 1.1, 1.0])
    assert corr["agreement"] == want
    rows = read_csv(tmp_path / "out" / "metric_correlations.csv")
    assert [r["metric"] for r in rows] == ["tstddev", "agreement"]


def test_results_without_the_metrics_give_the_report_as_before(tmp_path):
    fabricate_sweep(tmp_path / "results")
    out = analysis.write_report(str(tmp_path / "results"), str(tmp_path / "out"), error_bars=False)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Teacher-side metrics" not in text and "ECE" not in text
    assert "| scheme | T. stddev | T. stddev seeds | S. test loss | top-1 (last) | top-1 (best) | top-5 | " \
           "student seeds |\n" in text
    assert all(r["ece_mean"] == "" for r in read_csv(tmp_path / "out" / "summary.csv"))
    assert [r["metric"] for r in read_csv(tmp_path / "out" / "metric_correlations.csv")] == ["tstddev"] * 2
    assert all(v is None for p in out["summary"]["pairs"] for v in p["metric_correlations"].values())

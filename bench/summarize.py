"""One table for one ``bench/device_check.sh`` run: benchmark, measured, target, ratio, pass.

    python bench/summarize.py --manifest bench/results/device_check_<device>_<date>/manifest.tsv [--out FILE.json]
    python bench/summarize.py bench/results/kd_step_*.json ...     # or JSON files given directly (no manifest)

The manifest (written by device_check.sh, one line per step: name, bench, rc, seconds, budget, start time, JSON
path, log path) says which files belong to the run: a step's JSON counts only when it was written after the step
started, so results of an earlier run never pass for this one. A step that timed out or failed after printing
some rows contributes those rows from its log, marked ``(partial, log)``. Targets are those of README.md and
bench/NOTES.md (set for one H100): KD step 22,700 / 70,000 / 70,000 img/s, CRD/KD step cost <= 1.3x, every scheme
<= 0.3 ms at batch 64, the nine T. stddev runs <= 30 s. ratio = measured / target; in --quick runs the sizes are
not the targets' and the verdict is ``n/a (quick)``. kd_step.py's per-distiller rows (each distiller's step cost
relative to plain KD, paired windows) follow in a table of their own: distiller, pair, steps per dispatch, ms per
step of the distiller and of KD, the median ratio with its [min, max], compile seconds, and the reason of a
skipped one; CRD's ratio also enters the main table against its target. Standard library only, so it runs even
where jax does not.
"""
import argparse
import csv
import json
import os
import re
import sys

KD_TARGETS = {("resnet56", "resnet20", 64, "float32"): 22700.0, ("vgg13", "vgg8", 64, "float32"): 70000.0,
              ("resnet56", "resnet20", 512, "bfloat16"): 70000.0}
CRD_TARGET_RATIO = 1.3
AUG_TARGET_MS, AUG_TARGET_BATCH, AUG_BASE = 0.3, 64, "base_crop_flip"
TSTDDEV_TARGET_S, ORIGINAL_S_PER_SCHEME = 30.0, 152.0
PARTIAL = " (partial, log)"


def row(benchmark, measured, unit, target=None, better="higher", quick=False, verdict=None, note=""):
    """A table row; the target is judged when given (higher or lower is better)."""
    r = {"benchmark": benchmark, "measured": measured, "unit": unit, "target": target, "better": better,
         "ratio": None, "verdict": verdict or "info", "note": note}
    if target is not None and measured is not None:
        r["ratio"] = measured / target
        if verdict is None:
            ok = measured >= target if better == "higher" else measured <= target
            r["verdict"] = "n/a (quick)" if quick else ("PASS" if ok else "FAIL")
    return r


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "img/s":
        return f"{value:,.0f} img/s"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value} {unit}".strip()


# --- kd_step ---------------------------------------------------------------------------------------------------
KD_LOG_ROW = re.compile(r"^(\S+)->(\S+)\s+(\d+)\s+(float32|bfloat16)\s+(\S+)\s+(single|chunk)\s+([\d.]+)\s+"
                        r"([\d.]+)\s+([\d,]+)\s*$")


def kd_entries_from_log(text):
    """The JSON summary entries rebuilt from the rows kd_step.py printed (flushed one by one)."""
    cases = {}
    for line in text.splitlines():
        m = KD_LOG_ROW.match(line.strip())
        if not m:
            continue
        t, s, batch, dtype, distiller, driver = m.group(1), m.group(2), int(m.group(3)), m.group(4), m.group(5), \
            m.group(6)
        e = cases.setdefault((t, s, batch, dtype), {"teacher": t, "student": s, "batch": batch, "dtype": dtype})
        e[f"{'crd' if distiller == 'crd' else driver}_img_per_s"] = float(m.group(9).replace(",", ""))
    out = []
    for e in cases.values():
        if "crd_img_per_s" in e:
            e["crd_target_ratio"] = CRD_TARGET_RATIO
        if "chunk_img_per_s" in e and "single_img_per_s" in e:
            e["chunk_speedup"] = e["chunk_img_per_s"] / e["single_img_per_s"]
        if "chunk_img_per_s" in e and "crd_img_per_s" in e:
            e["crd_cost_ratio"] = e["chunk_img_per_s"] / e["crd_img_per_s"]
        out.append(e)
    return out


def kd_rows(entries, quick, chunk, tag=""):
    rows = []
    for e in entries:
        case = f"{e['teacher']}->{e['student']} b{e['batch']} {e['dtype']}"
        key = (e["teacher"], e["student"], e["batch"], e["dtype"])
        target = e.get("target_img_per_s", None if quick else KD_TARGETS.get(key))
        if "chunk_img_per_s" in e:
            rows.append(row(f"KD step {case} chunk K={chunk}{tag}", e["chunk_img_per_s"], "img/s", target,
                            quick=quick))
        if "single_img_per_s" in e:
            rows.append(row(f"KD step {case} single{tag}", e["single_img_per_s"], "img/s"))
        if "chunk_speedup" in e:
            rows.append(row(f"KD step {case} chunk / single{tag}", e["chunk_speedup"], "x"))
        if "crd_img_per_s" in e:
            rows.append(row(f"CRD step {case} chunk{tag}", e["crd_img_per_s"], "img/s"))
        if "crd_cost_ratio" in e:
            rows.append(row(f"CRD / KD step cost {case}{tag}", e["crd_cost_ratio"], "x",
                            e.get("crd_target_ratio", CRD_TARGET_RATIO), better="lower", quick=quick))
    return rows


# kd_step.py's distiller table: "NAME PAIR BATCH DTYPE K COMPILE MS KD_MS RATIO [MIN, MAX] NOTE", or, for a
# distiller not timed, "NAME PAIR BATCH DTYPE K - - - - - skipped: REASON" (or "error: ...").
DIST_LOG_OK = re.compile(r"^(\S+)\s+(\S+)->(\S+)\s+(\d+)\s+(float32|bfloat16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+"
                         r"([\d.]+)\s+([\d.]+)\s+\[([\d.]+), ([\d.]+)\]\s*(.*)$")
DIST_LOG_SKIP = re.compile(r"^(\S+)\s+(?:(\S+)->(\S+)|-)\s+(\d+)\s+(float32|bfloat16)\s+(\d+)\s+-\s+-\s+-\s+-\s+-\s+"
                           r"(skipped|error): (.*)$")


def distiller_entries_from_log(text):
    """kd_step.py's per-distiller rows (JSON layout) rebuilt from the lines it printed."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        ok, skip = DIST_LOG_OK.match(line), DIST_LOG_SKIP.match(line)
        m = ok or skip
        if not m:
            continue
        name = m.group(1)  # both line kinds open with the same six fields
        row = {"distiller": name, "spec": name.split(":")[0], "stage": "init" if name.endswith(":init") else "kd",
               "teacher": m.group(2), "student": m.group(3), "batch": int(m.group(4)), "dtype": m.group(5),
               "steps_per_dispatch": int(m.group(6))}
        if ok:
            row.update(status="ok", compile_s=float(m.group(7)), step_ms=float(m.group(8)),
                       kd_step_ms=float(m.group(9)), ratio_to_kd=float(m.group(10)), ratio_min=float(m.group(11)),
                       ratio_max=float(m.group(12)), note=m.group(13).strip())
        else:
            row.update(status=m.group(7), reason=m.group(8))
        out.append(row)
    return out


def distiller_rows(entries, quick, tag=""):
    """One row per distiller for the distiller table (``section`` 'distillers'), and CRD's ratio against its
    target for the main table."""
    rows = []
    for e in entries:
        pair = f"{e['teacher']}->{e['student']}" if e.get("teacher") else "-"
        case = f"{pair} b{e['batch']} {e['dtype']}"
        ok = e.get("status") == "ok"
        r = row(f"distiller {e['distiller']} / KD step cost {case} K={e.get('steps_per_dispatch', '?')}{tag}",
                e.get("ratio_to_kd") if ok else None, "x", verdict=None if ok else e.get("status", "?"))
        r.update(section="distillers", distiller=e["distiller"], pair=pair, batch=e["batch"], dtype=e["dtype"],
                 steps_per_dispatch=e.get("steps_per_dispatch"), status=e.get("status"),
                 step_ms=e.get("step_ms"), kd_step_ms=e.get("kd_step_ms"), ratio_min=e.get("ratio_min"),
                 ratio_max=e.get("ratio_max"), compile_s=e.get("compile_s"),
                 note=(e.get("note") or "") if ok else e.get("reason", ""), partial=bool(tag))
        rows.append(r)
        if ok and e.get("spec") == "crd" and e.get("stage", "kd") == "kd":
            rows.append(row(f"CRD / KD step cost {case} (paired){tag}", e["ratio_to_kd"], "x", CRD_TARGET_RATIO,
                            better="lower", quick=quick))
    return rows


def kd_step_rows(data, log_text, quick):
    if data is not None:
        quick = bool(data.get("quick"))
        return (kd_rows(data["summary"], quick, data.get("chunk", "?")) +
                distiller_rows(data.get("distillers", []), quick))
    chunk = re.search(r"chunk (\d+)", log_text)
    return (kd_rows(kd_entries_from_log(log_text), quick, chunk.group(1) if chunk else "?", PARTIAL) +
            distiller_rows(distiller_entries_from_log(log_text), quick, PARTIAL))


# --- forward -----------------------------------------------------------------------------------------------------
FWD_LOG_ROW = re.compile(r"^(\S+)\s+(float32|bfloat16)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s*$")


def forward_rows(data, log_text, quick):
    if data is not None:
        return [row(f"forward {r['model']} {r['dtype']} b{data['batch']}", r["img_per_s"], "img/s")
                for r in data["results"]]
    batch = re.search(r"\bbatch (\d+)", log_text)
    b = batch.group(1) if batch else "?"
    return [row(f"forward {m.group(1)} {m.group(2)} b{b}{PARTIAL}", float(m.group(6).replace(",", "")), "img/s")
            for m in map(FWD_LOG_ROW.match, log_text.splitlines()) if m]


# --- augment -----------------------------------------------------------------------------------------------------
AUG_LOG_ROW = re.compile(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s*$")


def augment_rows(data, log_text, quick):
    if data is not None:
        items, tag, quick = [(r["scheme"], r["batch"], 1e3 * r["median_s"]) for r in data["results"]], "", \
            bool(data.get("quick"))
    else:
        items = [(m.group(1), int(m.group(2)), float(m.group(4)))
                 for m in map(AUG_LOG_ROW.match, log_text.splitlines()) if m]
        tag = PARTIAL
    rows = []
    for scheme, batch, ms in items:
        judged = batch == AUG_TARGET_BATCH and scheme != AUG_BASE
        rows.append(row(f"augment {scheme} b{batch}{tag}", ms, "ms", AUG_TARGET_MS if judged else None,
                        better="lower", quick=quick))
    judged = [(ms, scheme) for scheme, batch, ms in items if batch == AUG_TARGET_BATCH and scheme != AUG_BASE]
    if judged:
        ms, scheme = max(judged)
        rows.append(row(f"augment slowest of {len(judged)} schemes at b{AUG_TARGET_BATCH} ({scheme}){tag}", ms, "ms",
                        AUG_TARGET_MS, better="lower", quick=quick))
    return rows


# --- tstddev -----------------------------------------------------------------------------------------------------
TSD_LOG = re.compile(r"nine schemes x (\d+) epoch\(s\): ([\d.]+) s \(([\d,]+) teacher img/s.*\+ ([\d.]+) s compile")


def tstddev_rows(data, log_text, quick):
    if data is not None:
        quick = data.get("mode") != "full"
        s = data.get("settings", {})
        what = f"{s.get('teacher', '?')} teacher, {data.get('num_train', '?')} images x {s.get('epochs', '?')} epochs"
        seconds, img_s, compile_s, tag = data["seconds_nine_schemes"], data.get("images_per_s"), \
            data.get("compile_s"), ""
        target = data.get("target_seconds", TSTDDEV_TARGET_S)
    else:
        m = TSD_LOG.search(log_text)
        if not m:
            return []
        what, seconds, img_s, compile_s, tag = f"{m.group(1)} epochs", float(m.group(2)), \
            float(m.group(3).replace(",", "")), float(m.group(4)), PARTIAL
        target = TSTDDEV_TARGET_S
    rows = [row(f"T. stddev, nine schemes ({what}){tag}", seconds, "s", target, better="lower", quick=quick)]
    if img_s is not None:
        rows.append(row(f"T. stddev teacher throughput{tag}", img_s, "img/s"))
    if compile_s is not None:
        rows.append(row(f"T. stddev compile (not timed){tag}", compile_s, "s"))
    if not quick and seconds:
        rows.append(row(f"T. stddev speed-up vs the original (9 x {ORIGINAL_S_PER_SCHEME:.0f} s){tag}",
                        9 * ORIGINAL_S_PER_SCHEME / seconds, "x"))
    return rows


# --- sweep_share -------------------------------------------------------------------------------------------------
SWEEP_LOG = re.compile(r"^(\d+) process\(es\): aggregate ([\d,]+) img/s")


def sweep_share_rows(data, log_text, quick):
    if data is not None:
        items, tag = [(r["processes"], r["aggregate_images_per_s"]) for r in data["rows"]], ""
    else:
        items = [(int(m.group(1)), float(m.group(2).replace(",", "")))
                 for m in map(SWEEP_LOG.match, log_text.splitlines()) if m]
        tag = PARTIAL
    if not items:
        return []
    base_n, base = items[0]
    rows = []
    for n, agg in items:
        if n == base_n:
            rows.append(row(f"sweep share {n} process(es), aggregate{tag}", agg, "img/s", verdict="baseline"))
            continue
        r = row(f"sweep share {n} processes, aggregate{tag}", agg, "img/s", base, verdict="x")
        r["verdict"] = f"parallel={n} wins" if agg > base else "one run wins"
        rows.append(r)
    return rows


# --- streamed_kd -------------------------------------------------------------------------------------------------
STREAMED_LOG = re.compile(r"^(\S+)->(\S+) (\d+)px batch (\d+) (\S+) streamed: ([\d,]+) img/s")


def streamed_kd_rows(data, log_text, quick):
    """The ImageNet KD step fed by the streamed source (bench/streamed_kd.py): no target yet, the first measurement."""
    if data is not None:
        return [row(f"streamed KD {r['teacher']}->{r['student']} {r['image_size']}px b{r['batch']} {r['dtype']}",
                    r["img_per_s"], "img/s", note=f"end to end, {r['host_cores']} host cores")
                for r in data["results"]]
    return [row(f"streamed KD {m.group(1)}->{m.group(2)} {m.group(3)}px b{m.group(4)} {m.group(5)}{PARTIAL}",
                float(m.group(6).replace(",", "")), "img/s")
            for m in map(STREAMED_LOG.match, log_text.splitlines()) if m]


HANDLERS = {"kd_step": kd_step_rows, "forward": forward_rows, "augment": augment_rows, "tstddev": tstddev_rows,
            "sweep_share": sweep_share_rows, "streamed_kd": streamed_kd_rows}


def guess_bench(path, data):
    name = os.path.basename(path)
    for bench in HANDLERS:
        if name.startswith(bench):
            return bench
    if data.get("bench") == "tstddev":
        return "tstddev"
    return None


def last_error(log_text):
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|Killed|Terminated|Traceback)", ln):
            return ln[:200]
    return lines[-1][:200] if lines else ""


def load_json(path, not_before=None):
    """The parsed file, or None when it is missing, unreadable, or older than this run's step."""
    try:
        if not_before is not None and os.path.getmtime(path) < not_before - 1:
            return None
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def summarize(steps):
    """steps: dicts with name, bench, rc, elapsed_s, timeout_s, start_epoch, json, log -> (rows, step records)."""
    rows, records, meta = [], [], {"device_kind": set(), "date": set()}
    for st in steps:
        data = load_json(st["json"], float(st["start_epoch"]) if st.get("start_epoch") else None)
        log_text = read_text(st.get("log") or "")
        quick = "--quick" in log_text.splitlines()[0] if log_text else False
        status = "ok" if str(st.get("rc")) == "0" else (
            "skipped" if st.get("rc") == "skipped" else
            "timeout" if str(st.get("rc")) in ("124", "137") else f"failed rc {st.get('rc')}")
        if data is not None:
            meta["device_kind"].add(data.get("device_kind", "?"))
            meta["date"].add(str(data.get("date", "?"))[:10])
        handler = HANDLERS.get(st["bench"])
        try:
            got = handler(data, log_text, quick) if handler and (data is not None or log_text) else []
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # a JSON of another layout
            got = []
            status += f"; unreadable result ({type(e).__name__}: {e})"
        if data is None and status == "ok":
            status = "ok but no JSON of this run"
        rec = {"step": st["name"], "bench": st["bench"], "status": status, "rc": st.get("rc"),
               "elapsed_s": st.get("elapsed_s"), "timeout_s": st.get("timeout_s"), "json": st["json"],
               "json_found": data is not None, "rows": len(got)}
        if status != "ok":
            rec["error"] = "no time left before the deadline" if status == "skipped" else (
                status.partition("; ")[2] or
                ("killed at its time budget; last output: " if status == "timeout" else "") + last_error(log_text))
            measured = ("SKIPPED" if status == "skipped" else
                        f"TIMEOUT {st.get('elapsed_s')}/{st.get('timeout_s')} s" if status == "timeout" else
                        "FAILED rc " + str(st.get("rc")) if status.startswith("failed") else
                        "no JSON" if status.startswith("ok but") else "unreadable JSON")
            rows.append({"benchmark": f"step {st['name']}", "measured": None, "unit": "", "target": None,
                         "better": "", "ratio": None, "verdict": "SKIP" if status == "skipped" else "FAIL",
                         "note": measured, "status_row": True})
        for r in got:
            r["step"] = st["name"]
        rows.extend(got)
        records.append(rec)
    seen = {}
    for r in rows:  # the same case measured by two steps (the --quick KD steps): name the step
        seen[r["benchmark"]] = seen.get(r["benchmark"], 0) + 1
    for r in rows:
        if seen[r["benchmark"]] > 1 and r.get("step"):
            r["benchmark"] += f" [{r['step']}]"
    return rows, records, {k: sorted(v) for k, v in meta.items()}


def target_text(r):
    if r["target"] is None:
        return "-"
    if r["verdict"].startswith("parallel") or r["verdict"].startswith("one run"):
        return f"> {fmt(r['target'], r['unit'])} (1 run)"
    return ("<= " if r["better"] == "lower" else ">= ") + fmt(r["target"], r["unit"])


def print_table(rows, records, meta, source):
    print(f"device check summary ({source})")
    print(f"device: {', '.join(meta['device_kind']) or '?'}   date: {', '.join(meta['date']) or '?'}   "
          f"targets: README.md / bench/NOTES.md, set for one H100")
    if records:
        print("steps: " + "; ".join(f"{r['step']} {r['status']} ({r['elapsed_s']}/{r['timeout_s']} s)"
                                    for r in records))
    print()
    table = [("benchmark", "measured", "target", "ratio", "pass")]
    dist = [r for r in rows if r.get("section") == "distillers"]
    rows = [r for r in rows if r.get("section") != "distillers"]
    for r in rows:
        measured = r["note"] if r.get("status_row") else fmt(r["measured"], r["unit"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        table.append((r["benchmark"], measured, target_text(r), ratio, r["verdict"]))
    widths = [max(len(t[i]) for t in table) for i in range(5)]
    for i, t in enumerate(table):
        print("  ".join(c.ljust(w) if j in (0, 4) else c.rjust(w) for j, (c, w) in enumerate(zip(t, widths)))
              .rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    verdicts = [r["verdict"] for r in rows]
    print()
    print(f"targets met: {verdicts.count('PASS')}, missed: {sum(v == 'FAIL' and not r.get('status_row') for v, r in zip(verdicts, rows))}, "
          f"n/a (quick): {verdicts.count('n/a (quick)')}; steps not ok: "
          f"{sum(r['status'] != 'ok' for r in records)} of {len(records)}")
    for rec in records:
        if rec.get("error"):
            msg = rec["status"] if rec["error"] in rec["status"] else f"{rec['status']}: {rec['error']}"
            print(f"  {rec['step']}: {msg}")
    if dist:
        print_distillers(dist)


def print_distillers(dist):
    """The distiller table: each distiller's step cost relative to plain KD (kd_step.py, paired windows)."""
    def num(v, f):
        return "-" if v is None else format(v, f)

    print()
    print("distillers vs plain KD (kd_step.py: median of paired KD/distiller windows; [min, max] their spread; "
          "K steps per dispatch)")
    table = [("distiller", "pair", "batch", "K", "ms/step", "KD ms/step", "ratio", "[min, max]", "compile s",
              "step", "note")]
    for r in dist:
        spread = "-" if r.get("ratio_min") is None else f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"
        note = r.get("note") or ""
        if r.get("status") != "ok":
            note = f"{r.get('status')}: {note}"
        if r.get("partial"):
            note = ("(partial, log) " + note).strip()
        table.append((r["distiller"], r["pair"], f"{r['batch']} {r['dtype']}", str(r.get("steps_per_dispatch", "?")),
                      num(r.get("step_ms"), ".3f"), num(r.get("kd_step_ms"), ".3f"), num(r.get("measured"), ".3f"),
                      spread, num(r.get("compile_s"), ".1f"), r.get("step") or "", note[:160]))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]) - 1)]
    for i, t in enumerate(table):
        cells = [c.ljust(w) if j in (0, 1, 2, 9) else c.rjust(w) for j, (c, w) in enumerate(zip(t, widths))]
        print("  ".join(cells + [t[-1]]).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths + [4]))
    ok = [r for r in dist if r.get("status") == "ok"]
    print(f"distillers timed: {len(ok)} of {len(dist)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="result JSON files (when there is no manifest)")
    p.add_argument("--manifest", default=None, help="manifest.tsv written by bench/device_check.sh")
    p.add_argument("--out", default=None, help="write the table and the step records to this JSON file")
    args = p.parse_args(argv)
    if not args.manifest and not args.files:
        p.error("give --manifest or JSON files")
    steps = []
    if args.manifest:
        with open(args.manifest) as f:
            steps = [dict(r) for r in csv.DictReader(f, delimiter="\t")]
        for st in steps:
            st["name"] = st.pop("step")
    for path in args.files:
        bench = guess_bench(path, load_json(path) or {})
        if bench is None:
            print(f"skipping {path}: not a benchmark result this script knows", file=sys.stderr)
            continue
        steps.append({"name": os.path.basename(path), "bench": bench, "rc": "0", "elapsed_s": "?",
                      "timeout_s": "?", "start_epoch": "", "json": path, "log": ""})
    rows, records, meta = summarize(steps)
    print_table(rows, records, meta, args.manifest or f"{len(args.files)} file(s)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device_kind": meta["device_kind"], "date": meta["date"], "manifest": args.manifest,
                       "steps": records, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

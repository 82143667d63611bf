"""How much of the demo is compiling: the XLA programs each run of the demo compiles, and its seconds.

    python bench/compiles.py                  # the demo's sweep with 1 epoch per run (the programs are the same
                                              # at any epoch count; the run seconds are not the demo's)
    python bench/compiles.py --epochs demo    # the demo as `kdjax demo` runs it (about 5 minutes on 2 cores)
    python bench/compiles.py --programs       # also every program's name and seconds, per run

Runs ``kdjax.configs.demo`` in this process (as ``kdjax demo`` does: one run after the other) in a fresh workdir
with a fresh persistent compilation cache, and listens to JAX's own monitoring events: a program is one backend
compile (``/jax/core/compile/backend_compile_duration``; a persistent-cache hit is counted as such, its seconds are
the load), compile seconds are the time covered by those and by tracing and lowering (``jaxpr_trace_duration``,
``jaxpr_to_mlir_module_duration``; nested traces count once). Run seconds are each run's wall time less its
compile seconds. Prints a row per run, then per task, then the whole; writes
``bench/results/compiles_<device>_<date>[_<epochs>].json``.
"""
import argparse
import collections
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import jax  # noqa: E402
from jax import monitoring  # noqa: E402

BACKEND = "/jax/core/compile/backend_compile_duration"
FRONTEND = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class Ledger:
    """Compile events, attributed to the run that is running (a stack: the sweep runs its runs inside itself)."""

    def __init__(self):
        self.stack, self.rows, self._hit = [], [], False

    def open(self, task, label):
        self.stack.append({"task": task, "run": label, "programs": [], "spans": [], "started": time.time()})

    def close(self):
        row = self.stack.pop()
        row["wall_s"] = time.time() - row.pop("started")
        self.rows.append(row)
        return row

    def on_event(self, event, **kwargs):
        if event == CACHE_HIT:
            self._hit = True

    def on_span(self, event, start, end, **kwargs):
        if not self.stack or (event != BACKEND and event not in FRONTEND):
            return
        row = self.stack[-1]
        row["spans"].append((start, end))
        if event == BACKEND:
            row["programs"].append({"name": str(kwargs.get("fun_name", "?")), "s": end - start, "hit": self._hit})
            self._hit = False


def union_seconds(spans):
    """Seconds covered by the spans (traces nest: a jitted function traced inside another's trace counts once)."""
    seconds, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        seconds += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return seconds


def summarize(row):
    compile_s = union_seconds(row["spans"])
    return {"task": row["task"], "run": row["run"], "programs": len(row["programs"]),
            "cache_hits": sum(p["hit"] for p in row["programs"]), "compile_s": compile_s,
            "backend_s": sum(p["s"] for p in row["programs"]), "run_s": row["wall_s"] - compile_s,
            "wall_s": row["wall_s"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", default="1", help="epochs of every run, or 'demo' for the demo's own")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--programs", action="store_true", help="print every program's name and seconds")
    p.add_argument("--no-write", action="store_true", help="do not write the JSON under bench/results")
    args = p.parse_args(argv)

    from kdjax import configs, tasks
    config = configs.task_config("demo")
    if args.epochs != "demo":
        with config.unlocked():
            config.epochs = config.teacher_epochs = config.tstddev_epochs = int(args.epochs)
    workdir = args.workdir or tempfile.mkdtemp(prefix="kdjax_compiles_")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise SystemExit(f"--workdir {workdir} is not empty: the count needs a fresh run and a fresh cache")

    ledger = Ledger()
    monitoring.register_event_listener(ledger.on_event)
    monitoring.register_event_time_span_listener(ledger.on_span)
    run_task = tasks.run

    def counted(task, config, workdir_):
        label = os.path.relpath(workdir_, workdir)
        ledger.open(task, label)
        try:
            return run_task(task, config, workdir_)
        finally:
            ledger.close()

    tasks.run = counted  # the sweep looks it up here for every run
    t0, load_start = time.time(), os.getloadavg()
    try:
        counted("sweep", config, workdir)
    finally:
        tasks.run = run_task
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    total_s = time.time() - t0

    runs = [summarize(r) for r in ledger.rows if r["task"] != "sweep"]
    sweep_row = summarize(next(r for r in ledger.rows if r["task"] == "sweep"))
    print(f"\n{'task':9} {'run':48} {'programs':>8} {'hits':>5} {'compile s':>10} {'run s':>8}")
    for row, raw in zip(runs, [r for r in ledger.rows if r["task"] != "sweep"]):
        print(f"{row['task']:9} {row['run'][:48]:48} {row['programs']:8d} {row['cache_hits']:5d} "
              f"{row['compile_s']:10.1f} {row['run_s']:8.1f}")
        if args.programs:
            for prog in raw["programs"]:
                print(f"{'':12}{prog['name'][:60]:60} {prog['s']:7.2f} s{' (cache hit)' if prog['hit'] else ''}")
    by_task = collections.OrderedDict()
    for row in runs:
        agg = by_task.setdefault(row["task"], {"runs": 0, "programs": 0, "cache_hits": 0, "compile_s": 0.0,
                                               "run_s": 0.0})
        for key in agg:
            agg[key] += 1 if key == "runs" else row[key]
    outside = {"programs": sweep_row["programs"], "compile_s": sweep_row["compile_s"]}  # between the runs
    print(f"\n{'task':9} {'runs':>5} {'programs':>8} {'per run':>8} {'hits':>5} {'compile s':>10} {'run s':>8}")
    for task, agg in by_task.items():
        print(f"{task:9} {agg['runs']:5d} {agg['programs']:8d} {agg['programs'] / agg['runs']:8.1f} "
              f"{agg['cache_hits']:5d} {agg['compile_s']:10.1f} {agg['run_s']:8.1f}")
    print(f"{'(sweep)':9} {'':5} {outside['programs']:8d} {'':8} {'':5} {outside['compile_s']:10.1f}")
    compile_total = outside["compile_s"] + sum(r["compile_s"] for r in runs)
    programs = outside["programs"] + sum(r["programs"] for r in runs)
    hits = sweep_row["cache_hits"] + sum(r["cache_hits"] for r in runs)
    print(f"\nall: {programs} programs ({hits} persistent-cache hits), {compile_total:.1f} s compiling of "
          f"{total_s:.1f} s ({100 * compile_total / total_s:.0f} %); load average {os.getloadavg()[0]:.1f} at the end")

    if not args.no_write:
        kind = jax.devices()[0].platform
        date = datetime.date.today().isoformat()
        suffix = "" if args.epochs == "demo" else f"_epochs{args.epochs}"
        out = REPO / "bench" / "results" / f"compiles_{kind}_{date}{suffix}.json"
        out.parent.mkdir(exist_ok=True)
        payload = {"bench": "compiles", "device": kind, "date": date, "epochs": args.epochs,
                   "versions": {"jax": jax.__version__}, "cpu_count": os.cpu_count(),
                   "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "runs": runs, "tasks": by_task,
                   "outside_runs": outside,
                   "total_s": total_s, "compile_s": compile_total, "programs": programs}
        out.write_text(json.dumps(payload, indent=1))
        print(f"written {out}")


if __name__ == "__main__":
    main()

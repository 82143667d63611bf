"""kdjax's KD step against the original's PyTorch step in the same run (``bench/kd_step.py --vs-original``).

The original's step runs in a subprocess of a Python that has torch (``bench/original_step.py --serve``, a child of
the benchmark: one process tree), idle on its stdin while kdjax's window runs; kdjax's XLA threads are idle while
the original's window runs. Repetition i times one window of each, A then B or B then A (alternating), so load that
comes and goes on a shared machine weighs on both sides of each ratio; ratio_i = kdjax img/s / original img/s of
repetition i, and the figure is their median, with min and max as the spread. The load average is recorded
around each repetition, and each side's process CPU seconds too: on a machine shared with other work, a process
pinned to one core (``taskset -c 0``) gets a CPU-seconds ratio that load barely moves (``cpu_ratio``); with
several threads it counts the threads' spinning as well (torch's OpenMP threads spin at barriers). kdjax itself never imports torch: only this subprocess does.

Both the clone of the original and the torch Python are optional: without either, ``skip_reason`` gives the one
line printed instead, and nothing else is run.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys

from results_io import TORCH_PYTHON_ENV, cpu_model, default_torch_python  # noqa: F401  (bench/ on sys.path)

ORIGINAL_REPO = "MingSun-Tse/Good-DA-in-KD"
RUNNER = pathlib.Path(__file__).resolve().parent / "original_step.py"
# files of the original the step imports (bench/original_step.py): their absence means the path is no clone
ORIGINAL_FILES = ("models/__init__.py", "helper/loops.py", "distiller_zoo/KD.py")


def skip_reason(original, torch_python):
    """'' when the original's step can be timed, else the one line that says why not and how to enable it."""
    if not original:
        return (f"original step not timed: no clone of the original given (--original DIR, a clone of "
                f"{ORIGINAL_REPO})")
    missing = [f for f in ORIGINAL_FILES if not (pathlib.Path(original) / f).is_file()]
    if missing:
        return (f"original step not timed: --original {original} is not a clone of {ORIGINAL_REPO} (no "
                f"{', '.join(missing)})")
    if not torch_python:
        return (f"original step not timed: no Python with torch ({TORCH_PYTHON_ENV} is unset; "
                f"--torch-python PATH names one)")
    if not os.path.exists(torch_python):
        return f"original step not timed: --torch-python {torch_python} does not exist"
    return ""


def original_command(torch_python, original, teacher, student, batch, image_size, num_classes, threads=None):
    """The command line of the original's step server (bench/original_step.py --serve)."""
    return [torch_python, str(RUNNER), "--serve", "--original", str(original), "--teacher", teacher, "--student",
            student, "--batch", str(batch), "--image-size", str(image_size), "--num-classes", str(num_classes)] + \
        (["--threads", str(threads)] if threads else [])


class OriginalServer:
    """The original's step in a child process running ``command`` (``original_command``); ``time(n)`` runs n
    steps there."""

    def __init__(self, command):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = None

    def _line(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the original's step process ended (exit code {self.proc.wait()}); its stderr "
                               "above says why")
        return line.strip()

    def ready(self):
        """Waits for the built, warmed-up step; returns its versions (torch, threads, ...)."""
        if self.info is None:
            line = self._line()
            if not line.startswith("ready "):
                raise RuntimeError(f"the original's step process said {line!r} instead of 'ready'")
            self.info = json.loads(line[len("ready "):])
        return self.info

    def time(self, steps):
        """(wall seconds, process CPU seconds) of ``steps`` steps of the original."""
        self.ready()
        self.proc.stdin.write(f"time {steps}\n")
        self.proc.stdin.flush()
        line = self._line()
        words = line.split()
        if len(words) != 4 or words[0] != "seconds" or words[2] != "cpu":
            raise RuntimeError(f"the original's step process said {line!r} instead of 'seconds S cpu C'")
        return float(words[1]), float(words[3])

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on every platform
        return None


def interleaved_windows(time_a, time_b, steps, repeats, load=load_average):
    """``repeats`` pairs of windows of ``steps`` steps, A first in even repetitions and B first in odd ones.

    ``time_a(steps)`` / ``time_b(steps)`` return a window's (wall seconds, CPU seconds). Returns a list of dicts
    ``{"a_s", "b_s", "a_cpu_s", "b_cpu_s", "order", "load"}`` (load: the 1-minute load average before and after
    the pair)."""
    pairs = []
    for i in range(repeats):
        before = load()
        if i % 2 == 0:
            a = time_a(steps)
            b = time_b(steps)
        else:
            b = time_b(steps)
            a = time_a(steps)
        pairs.append({"a_s": a[0], "b_s": b[0], "a_cpu_s": a[1], "b_cpu_s": b[1], "order": "ab" if i % 2 == 0
                      else "ba", "load": [before, load()]})
    return pairs


def ratio_summary(pairs, batch, steps):
    """img/s of both sides (median windows) and ratio_i = A img/s / B img/s = B seconds / A seconds per pair:
    median, min, max."""
    ratios = [p["b_s"] / p["a_s"] for p in pairs]
    cpu_ratios = [p["b_cpu_s"] / p["a_cpu_s"] for p in pairs]
    a_med = statistics.median(p["a_s"] for p in pairs)
    b_med = statistics.median(p["b_s"] for p in pairs)
    loads = [x for p in pairs for x in p["load"] if x is not None]
    return {"kdjax_img_per_s": batch * steps / a_med, "original_img_per_s": batch * steps / b_med,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratios": [round(r, 4) for r in ratios], "cpu_ratio": statistics.median(cpu_ratios),
            "cpu_ratios": [round(r, 4) for r in cpu_ratios], "load_min": min(loads) if loads else None,
            "load_max": max(loads) if loads else None}


def summary_line(s, teacher, student, batch, dtype):
    load = "" if s["load_min"] is None else f"; load average {s['load_min']:.1f}-{s['load_max']:.1f}"
    return (f"{teacher}->{student} batch {batch} {dtype}: kdjax {s['kdjax_img_per_s']:,.1f} img/s, original "
            f"(PyTorch) {s['original_img_per_s']:,.1f} img/s: kdjax / original = {s['ratio']:.2f}x "
            f"[{s['ratio_min']:.2f}, {s['ratio_max']:.2f}] over {len(s['ratios'])} interleaved pairs (CPU seconds: "
            f"{s['cpu_ratio']:.2f}x){load}")


def cpu_flags():
    """The vector ISA the CPU offers (avx512f / avx2), for the record: XLA:CPU's and oneDNN's kernels differ."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma") if f in flags]
    except OSError:
        pass
    return []


def environment():
    """What the figures depend on besides the code: CPU, cores (and those this process may use: taskset), XLA_FLAGS,
    Python."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "cores_usable": usable,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": sys.version.split()[0]}

"""Run bookkeeping: progress lines people can read, JSON-lines metrics, optional TensorBoard, results.json."""
import json
import math
import os
import platform
import time
from importlib import metadata
from typing import Any, Mapping, Optional

import jax

from kdjax.errors import KdjaxError

VERSIONED_PACKAGES = ("kdjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_kind() -> str:
    return jax.devices()[0].device_kind


def devices_line(num_devices: int) -> str:
    """"2 x NVIDIA H100 80GB HBM3 (gpu)": what a run computes on, named in its first line so that a silent fall-back
    to the CPU is visible."""
    device = jax.devices()[0]
    return f"{num_devices} x {device.device_kind} ({device.platform})"


def is_main_process() -> bool:
    return jax.process_index() == 0


def format_eta(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour); '?' while unknown."""
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLog:
    """The human lines of a run, the one place kdjax prints them: ``[tag] text`` on stdout, process 0 only;
    ``progress`` lines at most one per ``min_interval_s`` unless forced (an epoch end), as one-step dispatches
    (CPU) would otherwise print a line per step."""

    def __init__(self, tag: str, min_interval_s: float = 5.0):
        self.tag = tag
        self.min_interval_s = min_interval_s
        self.main = is_main_process()
        self._last_progress = 0.0

    def line(self, text: str, tag: Optional[str] = None) -> None:
        if self.main:
            print(f"[{tag or self.tag}] {text}", flush=True)

    def progress(self, text: str, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_progress < self.min_interval_s:
            return
        self._last_progress = now
        self.line(text)


class MetricsWriteError(KdjaxError, RuntimeError):
    """metrics.jsonl could not be written (a full disk): the message says how to resume."""


class RunLog:
    """One human line and one JSON line per logged chunk (process 0 only); TensorBoard when tensorboardX exists."""

    def __init__(self, workdir: str, total_steps: int, name: str = "train", min_interval_s: float = 5.0):
        self.total_steps = total_steps
        self.human = ProgressLog(name, min_interval_s)
        self.main = is_main_process()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.main:
            try:  # tensorboardX writes event files without importing TensorFlow
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass
        self.name = name

    def forget_after(self, step: int) -> None:
        """Drop the rows of steps after ``step``: a resumed run replays them, so each step stays logged once."""
        if not self.main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = f.readlines()
        kept = [row for row in rows if _row_step(row) <= step]
        if len(kept) != len(rows):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)

    def evaluations(self) -> list:
        """The evaluation rows logged so far (those with a ``top1``), e.g. of the epochs before a resume."""
        if not self.main or not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "test_loss" in row and "top1" in row and "epoch" in row:  # evaluation rows, not train rows
                    rows.append(row)
        return rows

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        if not self.main:
            return
        row = {"step": int(step), "time": time.time(), **{k: _plain(v) for k, v in record.items()}}
        from kdjax.workdir import check_still_held
        check_still_held(self.path)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk, a vanished mount: one line, the checkpoints so far stay intact
            raise MetricsWriteError(f"could not append to {self.path} ({e.strerror or e}) at step {step}: free "
                                    f"space and run the same command to resume from the last checkpoint") from None
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.add_scalar(f"{self.name}/{k}", v, step)

    def progress(self, step: int, epoch: int, epochs: int, loss: float, lr: float, images_per_s: float,
                 seconds_per_step: float, extra: str = "", force: bool = False) -> None:
        """A human progress line (throttled, see ``ProgressLog``; ``force`` at the end of an epoch)."""
        eta = format_eta((self.total_steps - step) * seconds_per_step)
        self.human.progress(f"epoch {epoch}/{epochs} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.4g} "
                            f"{images_per_s:,.0f} img/s ETA {eta}{extra}", force=force)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _row_step(row: str) -> int:
    try:
        return int(json.loads(row).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable (torn) last line is dropped with the replayed steps


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v if isinstance(v, (str, int, list, dict)) or v is None else str(v)


class NonFiniteResult(ValueError):
    """A run's headline figure is NaN or infinite: it is not written as a finished result."""


# The figures of a model's evaluation, which a finished run is read by (the report, a sweep, a user): none may be NaN
# or infinite. (A T. stddev may be NaN by itself: a statistic over too few draws, not a broken model.)
FIGURES = ("test_loss", "top1", "top5", "best_top1", "best_test_loss")


def check_finite_figures(results: Mapping[str, Any], workdir: str) -> None:
    for key in FIGURES:
        value = results.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteResult(f"{key} of the run in {workdir} is {value}: a non-finite result is not written as "
                                  f"finished; lower --config.optim.lr, or check the checkpoint it evaluates")


def write_results(workdir: str, results: Mapping[str, Any], config: Optional[Any] = None) -> str:
    """``workdir/results.json`` (the README's fields), written atomically so a crash never leaves half a file;
    never with a non-finite figure (``check_finite_figures``)."""
    check_finite_figures(results, workdir)
    out = dict(results)
    out.setdefault("device_kind", device_kind())
    out.setdefault("versions", versions())
    if config is not None:
        out["config"] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    path = os.path.join(workdir, "results.json")
    if is_main_process():
        from kdjax.workdir import check_still_held
        os.makedirs(workdir, exist_ok=True)
        check_still_held(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True, default=str)
        os.replace(tmp, path)
    return path


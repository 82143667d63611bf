"""A workdir belongs to one run: its config is recorded at the first start and a resume must match it, and
one process at a time holds it (``WorkdirLock``).

The lock is a file ``.kdjax.lock`` created atomically (``O_EXCL``), holding the holder's host, PID and a
heartbeat the holder refreshes every minute. It is stale when its PID is gone on the same host, or when its
heartbeat is older than ``STALE_AFTER_S`` (a holder on another host of a shared filesystem that died); a stale
lock is taken over with one line on stderr.
"""
import json
import os
import socket
import sys
import threading
import time
from typing import Iterable

from flax import traverse_util
from kdjax.errors import KdjaxError

RUN_CONFIG = "run_config.json"
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_FIELDS = ("eval_every", "log_every", "checkpoint_every", "steps_per_dispatch", "keep_checkpoints",
                    "compile_cache_dir")


def _flatten(d: dict) -> dict:
    """{"optim.lr": ...}: nested fields by dotted name (an empty group stays one entry)."""
    return traverse_util.flatten_dict(d, sep=".", keep_empty_nodes=False)


def _normalise(value):
    return json.loads(json.dumps(value, default=str))


# Fields whose "not set" was spelled "" (or 0) before they became placeholders.
_WAS_EMPTY_STRING = ("data_dir", "manual_dir", "teacher_checkpoint", "student_checkpoint", "student", "checkpoint",
                     "model", "results_dir", "source")
_DATASET_OPTIONS = ("num_classes", "num_train", "num_test", "seed")


def upgrade_recorded(recorded: dict) -> dict:
    """A run config recorded by kdjax 0.1 in today's spelling: "" -> None for path fields, image_size 0 -> None,
    dataset_options "k=v;k=v" -> a group of fields. A workdir started by 0.1 then resumes under today's config."""
    out = dict(recorded)
    for key in _WAS_EMPTY_STRING:
        if out.get(key) == "":
            out[key] = None
    if out.get("image_size") == 0:
        out["image_size"] = None
    if isinstance(out.get("dataset_options"), str):
        options = dict.fromkeys(_DATASET_OPTIONS)
        for item in filter(None, out["dataset_options"].split(";")):
            key, _, value = item.partition("=")
            options[key.strip()] = json.loads(value) if value.strip().lstrip("-").isdigit() else value.strip()
        out["dataset_options"] = options
    optim = out.get("optim")
    if isinstance(optim, dict) and "decay_fractions" not in optim:  # absolute milestones were the only kind
        out["optim"] = dict(optim, decay_fractions=None)
    return out


def _adopt_recorded_schedule(config, recorded: dict) -> None:
    """A run started with absolute milestones resumes with them when the command leaves the schedule unset: the
    default became fractions of the run, which would change a resumed run's learning rate half way."""
    optim = recorded.get("optim") or {}
    if optim.get("decay_epochs") is None or "optim" not in config:
        return
    if config.optim.get("decay_epochs") is None and config.optim.get("decay_fractions") is None:
        with config.unlocked():
            config.optim.decay_epochs = tuple(int(e) for e in optim["decay_epochs"])
        print(f"note: resuming with the run's recorded absolute lr milestones {tuple(optim['decay_epochs'])}",
              flush=True)


LOCK_FILE = ".kdjax.lock"
STALE_AFTER_S = 600.0
HEARTBEAT_S = 60.0


class WorkdirBusy(KdjaxError, RuntimeError):
    """Another live process holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: str):
    """The holder record of the lock file at ``path``, or None when it is absent or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # half-written or removed meanwhile: judged by its age below


def _is_stale(holder, path: str, now: float) -> bool:
    if holder is None:
        try:
            return now - os.path.getmtime(path) > 5.0  # a lock no one finished writing
        except OSError:
            return True
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return True
    return now - float(holder.get("heartbeat", 0.0)) > STALE_AFTER_S


def remove_lock_held_by(workdir: str, host, pid):
    """Take over a lock that a scheduler knows to be dead although this host cannot see it (a SLURM job's previous
    incarnation on another node, an ended job): remove the workdir's lock if the process ``pid`` on ``host``
    holds it. Returns the holder record, or None when the lock is absent, unreadable or held by another process."""
    path = os.path.join(workdir, LOCK_FILE)
    holder = read_lock(path)
    if holder is None or holder.get("host") != host or holder.get("pid") != pid:
        return None
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return holder


class WorkdirLock:
    """Exclusive hold of a workdir for one process (module docstring); a context manager."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()})

    def acquire(self) -> "WorkdirLock":
        import jax
        if jax.process_index() != 0:  # the processes of one multi-host run share its workdir: process 0 holds it
            return self
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                    return self  # this process holds it already (a task inside a sweep in process)
                if not _is_stale(holder, self.path, time.time()):
                    raise WorkdirBusy(f"workdir {os.path.dirname(self.path)} is in use by PID {holder.get('pid')} on "
                                      f"{holder.get('host')}: wait for it to finish, or use another --workdir") \
                        from None
                print(f"warning: taking over the stale lock of {os.path.dirname(self.path)} (PID "
                      f"{(holder or {}).get('pid')} on {(holder or {}).get('host')} is gone)", file=sys.stderr,
                      flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return self
        raise WorkdirBusy(f"could not lock {os.path.dirname(self.path)}: another process keeps taking it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            tmp = f"{self.path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(self._record())
                os.replace(tmp, self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        holder = read_lock(self.path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_writable(workdir: str) -> None:
    """One line now, not a traceback after the first epoch, when the workdir cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir} is not writable ({e.strerror}): choose another --workdir or free "
                         f"space") from None


def write_config(workdir: str, config) -> None:
    """``workdir/config.json``: the resolved config of the run that holds the workdir."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config.to_dict() if hasattr(config, "to_dict") else dict(config), f, indent=1, sort_keys=True,
                  default=str)
    os.replace(tmp, path)


def _differences(workdir: str, config, ignore: Iterable[str]):
    """None when ``workdir`` records no run yet, else the fields in which its recorded config differs from
    ``config`` (a run started with absolute milestones keeps them, see ``_adopt_recorded_schedule``)."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        upgraded = upgrade_recorded(json.load(f))
    _adopt_recorded_schedule(config, upgraded)
    current = _flatten(_normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config)))
    recorded = _flatten(upgraded)
    # A field added to kdjax after the run started is absent from its record: left unset, it changes nothing.
    skip = set(ignore) | {k for k, v in current.items() if v is None and k not in recorded}
    return {k: (recorded.get(k, "<absent>"), current.get(k, "<absent>")) for k in set(recorded) | set(current)
            if k not in skip and recorded.get(k, "<absent>") != current.get(k, "<absent>")}


def finished_results(workdir: str, config, ignore: Iterable[str] = RESUMABLE_FIELDS):
    """The results of the run in ``workdir`` when it finished with this same config, else None: a finished run
    started again is answered from its results.json, without restoring or re-evaluating anything."""
    results = os.path.join(workdir, "results.json")
    if not os.path.exists(results) or _differences(workdir, config, ignore) != {}:
        return None
    with open(results) as f:
        return json.load(f)


def claim(workdir: str, config, ignore: Iterable[str] = RESUMABLE_FIELDS) -> None:
    """Record ``config`` in ``workdir``, or check that it equals the one already recorded (same run, resuming).

    Call it after every check that can refuse the launch (names, data, checkpoints) and while holding the
    workdir's lock, so that a refused launch records nothing. Raises ValueError naming every differing field:
    resuming a different run would mix two experiments.
    """
    diff = _differences(workdir, config, ignore)
    if diff:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
        raise ValueError(f"workdir {workdir} holds a run with a different config ({details}); use a new "
                         f"--workdir, or repeat the recorded config to resume it")
    if diff is None:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, RUN_CONFIG), "w") as f:
            json.dump(_normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config)), f, indent=1,
                      sort_keys=True)
    write_config(workdir, config)

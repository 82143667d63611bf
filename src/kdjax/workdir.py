"""A workdir belongs to one run: its config is recorded at the first start and a resume must match it, and
one process at a time holds it (``WorkdirLock``).

The lock is a file ``.kdjax.lock`` created atomically (``O_EXCL``), holding the holder's host, PID, a random
token and a heartbeat the holder refreshes every minute. It is stale when its PID is gone on the same host (a live
PID there never is, however old its heartbeat: a paused process resumes and writes), or, for a holder on another
host of a shared filesystem, when its heartbeat is older than ``STALE_AFTER_S``; a stale lock is taken over with
one line on stderr saying why. Every write of a run (checkpoint, metrics row, results.json) is fenced by the
token (``check_still_held``): a holder whose lock was taken over stops before its next write.

A task never writes into another task's finished workdir (``check_owner``), and a resumed run consumes the same
inputs it started with (``claim``'s ``inputs``).
"""
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Dict, Iterable, Optional

from flax import traverse_util
from kdjax.errors import KdjaxError

RUN_CONFIG = "run_config.json"
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_FIELDS = ("eval_every", "log_every", "checkpoint_every", "checkpoint_every_steps", "steps_per_dispatch",
                    "keep_checkpoints", "compile_cache_dir", "verify", "placement", "scheme_switch")


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


def adopt_recorded_schedule(workdir: str, config) -> None:
    """A run started with absolute milestones resumes with them when the command leaves the schedule unset: the
    default became fractions of the run, which would change a resumed run's learning rate half way. The frame
    calls it before the task's checks, which resolve the schedule from the config."""
    recorded = _recorded_config(workdir)
    optim = (recorded or {}).get("optim") or {}
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


class LockLost(WorkdirBusy):
    """This process held the workdir, but its lock is gone or another process's now: it must not write there."""


# {absolute workdir: token} of the locks this process holds; the fences (``check_still_held``) compare the lock
# file's token with it before every write.
_HELD: Dict[str, str] = {}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_fields(record) -> Optional[dict]:
    """The record with its fields in their types, or None when it is not a holder record at all."""
    if not isinstance(record, dict):
        return None
    try:
        return {"host": str(record.get("host", "")), "pid": int(record.get("pid", -1)),
                "heartbeat": float(record.get("heartbeat", 0.0)), "token": str(record.get("token", ""))}
    except (TypeError, ValueError):
        return None


def read_lock(path: str):
    """The holder record of the lock file at ``path`` (host, pid, heartbeat, token), or None when it is absent,
    unreadable or malformed."""
    try:
        with open(path) as f:
            return _holder_fields(json.load(f))
    except (OSError, ValueError):
        return None  # half-written, removed meanwhile or not a record: judged by its age below


def _stale_reason(holder, path: str, now: float) -> Optional[str]:
    """Why the lock at ``path`` may be taken over, or None while its holder may be alive. A live PID on this host is
    never stale, however old its heartbeat (a paused process, SIGSTOP, comes back and writes); a holder on another
    host is judged by its heartbeat alone."""
    if holder is None:
        try:
            age = now - os.path.getmtime(path)
        except OSError:
            return "its lock file is gone"
        return f"its lock file is unreadable and {age:.0f} s old" if age > 5.0 else None  # else: being written
    if holder["host"] == socket.gethostname():
        return None if _pid_alive(holder["pid"]) else f"PID {holder['pid']} on {holder['host']} is gone"
    age = now - holder["heartbeat"]
    if age > STALE_AFTER_S:
        return (f"PID {holder['pid']} on {holder['host']}, another host, has not renewed it for {age:.0f} s "
                f"(over {STALE_AFTER_S:.0f} s)")
    return None


def _is_stale(holder, path: str, now: float) -> bool:
    return _stale_reason(holder, path, now) is not None


def pid_alive_here(holder) -> bool:
    """Whether the lock's holder is a live process on this host: such a lock is never taken over (the SLURM
    requeue's take-over follows the same rule)."""
    return holder is not None and holder["host"] == socket.gethostname() and _pid_alive(holder["pid"])


def _held_root(path: str) -> Optional[str]:
    """The workdir this process holds that contains ``path`` (itself or a parent), else None."""
    path = os.path.abspath(path)
    while True:
        if path in _HELD:
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def check_still_held(path: str) -> None:
    """The fence before a write to ``path`` (a checkpoint, metrics.jsonl, results.json): when this process took
    the lock of the workdir holding ``path``, that lock must still carry its token; otherwise another process
    took the workdir over (this one was paused or cut off) and this one stops before writing anything."""
    root = _held_root(path)
    if root is None:
        return  # not written under a lock of this process (a library call without a workdir lock)
    holder = read_lock(os.path.join(root, LOCK_FILE))
    if holder is not None and holder["token"] == _HELD[root]:
        return
    now = (f"PID {holder['pid']} on {holder['host']} holds it now" if holder is not None
           else "its lock file is gone")
    raise LockLost(f"this run lost the lock of {root} ({now}): it stopped before writing so that only one process "
                   f"writes there; let the other run finish, or stop it and run the same command to resume")


def remove_lock_held_by(workdir: str, host, pid):
    """Take over a lock that a scheduler knows to be dead although this host cannot see it (a SLURM job's previous
    incarnation on another node, an ended job): remove the workdir's lock if the process ``pid`` on ``host``
    holds it. Returns the holder record, or None when the lock is absent, unreadable, held by another process, or
    by a PID still alive on this host (the lock's own rule)."""
    path = os.path.join(workdir, LOCK_FILE)
    holder = read_lock(path)
    if holder is None or holder["host"] != host or holder["pid"] != pid or pid_alive_here(holder):
        return None  # a live PID on this host is never taken over, whatever the scheduler says
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return holder


class WorkdirLock:
    """Exclusive hold of a workdir for one process (module docstring); a context manager."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None

    def _record(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                           "token": self.token})

    def acquire(self) -> "WorkdirLock":
        import jax
        if jax.process_index() != 0:  # the processes of one multi-host run share its workdir: process 0 holds it
            return self
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder and holder["host"] == socket.gethostname() and holder["pid"] == os.getpid():
                    return self  # this process holds it already (a task inside a sweep in process)
                reason = _stale_reason(holder, self.path, time.time())
                if reason is None:
                    who = (f"PID {holder['pid']} on {holder['host']}" if holder is not None
                           else "a process that is writing its lock file")
                    raise WorkdirBusy(f"workdir {self.workdir} is in use by {who}: wait for it to finish, or use "
                                      f"another --workdir") from None
                print(f"warning: taking over the stale lock of {self.workdir} ({reason})", file=sys.stderr,
                      flush=True)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise WorkdirBusy(f"cannot create the lock file {self.path} ({e.strerror}): check that {self.workdir}"
                                  f" is a writable directory, or use another --workdir") from None
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
            _HELD[self.workdir] = self.token
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return self
        raise WorkdirBusy(f"could not lock {self.workdir}: another process keeps taking it")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = read_lock(self.path)
            if holder is None or holder["token"] != self.token:
                return  # taken over: renewing would overwrite the new holder's record (the fences stop the run)
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
        if _HELD.get(self.workdir) == self.token:
            del _HELD[self.workdir]
        holder = read_lock(self.path)
        if holder and holder["token"] == self.token:
            os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_writable(workdir: str) -> None:
    """One line now, not a traceback after the first epoch, when the workdir cannot be written (or its
    ``checkpoints`` is a file)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise ValueError(f"{checkpoints} is a file, not a checkpoints folder: move it away, or use another --workdir")
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
    tmp = f"{path}.{os.getpid()}.tmp"  # every process of a multi-process run writes it: never one shared temp file
    with open(tmp, "w") as f:
        json.dump(config.to_dict() if hasattr(config, "to_dict") else dict(config), f, indent=1, sort_keys=True,
                  default=str)
    os.replace(tmp, path)


def _recorded_config(workdir: str) -> Optional[dict]:
    """The run config ``workdir`` records (in today's spelling), None when it records no run yet."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return upgrade_recorded(json.load(f))


def _differences(workdir: str, config, ignore: Iterable[str]):
    """None when ``workdir`` records no run yet, else the fields in which its recorded config differs from
    ``config`` (a run started with absolute milestones keeps them: ``adopt_recorded_schedule``)."""
    upgraded = _recorded_config(workdir)
    if upgraded is None:
        return None
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


INPUTS = "inputs.json"
RESULTS = "results.json"
# Files of a workdir that a task owns once it ran there (config.json alone is written by any launch).
_RUN_MARKERS = (RUN_CONFIG, "checkpoints")


def _recorded_task(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    task = record.get("task") if isinstance(record, dict) else None
    if task is None and isinstance(record, dict):
        task = (record.get("config") or {}).get("task") if isinstance(record.get("config"), dict) else None
    return task if isinstance(task, str) else None


def check_owner(workdir: str, task: str) -> None:
    """Refuse to write into a workdir that another task's run owns: one whose results.json records another task
    (e.g. ``evaluate`` or ``import_torch`` pointed at a teacher's workdir would replace its results while its
    consumers keep loading its checkpoints), or that holds another task's run config or checkpoints."""
    other = _recorded_task(os.path.join(workdir, RESULTS))
    if other is None and any(os.path.exists(os.path.join(workdir, m)) for m in _RUN_MARKERS):
        other = _recorded_task(os.path.join(workdir, "config.json")) or _recorded_task(
            os.path.join(workdir, RUN_CONFIG))
    if other is not None and other != task:
        article = "an" if task[0] in "aeiou" else "a"
        raise ValueError(f"workdir {workdir} holds a {other} run; {article} {task} run never writes into another "
                         f"task's workdir: use a new --workdir")


def _check_inputs(workdir: str, inputs: Dict[str, dict], first_start: bool) -> None:
    """Record the inputs (checkpoint digests by role) at the first start; a resume must consume the same ones, or
    its results would mix two teachers while naming one."""
    path = os.path.join(workdir, INPUTS)
    current = {role: record.get("digest") for role, record in inputs.items()}
    if not first_start and os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        changed = sorted(role for role in set(recorded) | set(current) if recorded.get(role) != current.get(role))
        if changed:
            details = ", ".join(f"{role} {str(recorded.get(role))[:12]} -> {str(current.get(role))[:12]}"
                                for role in changed)
            raise ValueError(f"workdir {workdir} holds a run started with other inputs ({details}, by content "
                             f"digest): resume it with the checkpoints it started with, or use a new --workdir")
        return
    check_still_held(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def claim(workdir: str, config, ignore: Iterable[str] = RESUMABLE_FIELDS,
          inputs: Optional[Dict[str, dict]] = None) -> None:
    """Record ``config`` in ``workdir``, or check that it equals the one already recorded (same run, resuming).

    Call it after every check that can refuse the launch (names, data, checkpoints, the batch against the dataset)
    and while holding the workdir's lock, so that a refused launch records nothing. Raises ValueError naming every
    differing field: resuming a different run would mix two experiments. A workdir of another task is refused
    (``check_owner``); ``inputs`` ({role: ``tasks.common.input_record``}) must be those the run started with.
    """
    if config.get("task"):
        check_owner(workdir, config.task)
    diff = _differences(workdir, config, ignore)
    if diff:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
        raise ValueError(f"workdir {workdir} holds a run with a different config ({details}); use a new "
                         f"--workdir, or repeat the recorded config to resume it")
    if inputs is not None:
        _check_inputs(workdir, inputs, first_start=diff is None)
    if diff is None:
        os.makedirs(workdir, exist_ok=True)
        check_still_held(workdir)
        with open(os.path.join(workdir, RUN_CONFIG), "w") as f:
            json.dump(_normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config)), f, indent=1,
                      sort_keys=True)
    write_config(workdir, config)

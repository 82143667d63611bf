"""kdjax.sweep.shards with a stand-in for the tasks (no training): inputs first, a run locked by another live
process left to it, failures recorded in the run's workdir for every shard to see and retried up to max_retries,
then given up with the runs that wait on them blocked.
(Two real shard processes: tests/tasks/test_sweep_shard_processes.py.)"""
import json
import os
import socket
import threading
import time

import pytest

from kdjax.sweep import shards
from kdjax.sweep.grid import Run
from kdjax.workdir import LOCK_FILE


def _grid(tmp_path):
    t = Run("teacher", str(tmp_path / "t"), (), 0)
    students = [Run("distill", str(tmp_path / f"s{i}"), (("teacher_checkpoint", t.workdir),), 2) for i in range(3)]
    bad = Run("distill", str(tmp_path / "bad"), (("teacher_checkpoint", t.workdir),), 2)
    after_bad = Run("tstddev", str(tmp_path / "after_bad"), (("student_checkpoint", bad.workdir),), 3)
    return [t, *students, bad, after_bad]


def test_parse_shard():
    assert shards.parse_shard("1/3") == (1, 3)
    for text in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            shards.parse_shard(text)


def test_a_shard_waits_for_locked_runs_retries_failures_then_gives_up(tmp_path, monkeypatch):
    runs = _grid(tmp_path)
    t, s0, s1, s2, bad, after_bad = runs
    started = {}

    def fake_task(task, fields, workdir):
        if workdir == bad.workdir:
            raise ValueError("this run always fails")
        for key in ("teacher_checkpoint", "student_checkpoint"):  # inputs are finished before a run starts
            if fields.get(key):
                assert os.path.exists(os.path.join(fields[key], "results.json"))
        started[workdir] = time.monotonic()
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"task": task}, f)

    monkeypatch.setattr(shards, "build_config", lambda run: dict(run.fields))
    os.makedirs(s1.workdir)  # another live process (our parent) holds s1 for a while
    with open(os.path.join(s1.workdir, LOCK_FILE), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": time.time()}, f)
    released = {}

    def release():
        time.sleep(1.0)
        released["at"] = time.monotonic()
        os.remove(os.path.join(s1.workdir, LOCK_FILE))

    threading.Thread(target=release, daemon=True).start()
    lines = []
    # shard 1/2 starts half way down the plan: at a student that cannot run before the teacher
    outcome = shards.run_shard(runs, fake_task, 1, 2, max_retries=1, poll_s=0.05, log=lines.append)
    assert [r.workdir for r in outcome.completed] == [t.workdir, s2.workdir, s0.workdir, s1.workdir]
    assert started[s1.workdir] > released["at"]
    assert shards.failures(bad) == 2  # max_retries + 1 attempts in all
    assert [r.workdir for r in outcome.failed] == [bad.workdir, after_bad.workdir]
    assert not os.path.exists(after_bad.workdir)  # blocked: never started
    assert any("all running elsewhere or waiting for their inputs" in line for line in lines)
    # a second shard finds nothing left: the failures recorded by the first count for it too
    again = shards.run_shard(runs, fake_task, 0, 2, max_retries=1, poll_s=0.05, log=lines.append)
    assert not again.completed and len(again.skipped) == 4 and shards.failures(bad) == 2

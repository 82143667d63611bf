"""One writer per workdir: a live PID on this host is never stale, a holder that lost its lock writes nothing more,
and a malformed lock file is one line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kdjax import runlog, workdir as workdir_lib
from kdjax.checkpoint.store import TrainCheckpointer
from kdjax.sweep import slurm
from kdjax.workdir import LOCK_FILE, WorkdirBusy, WorkdirLock


def _write_lock(workdir, **record):
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


def test_a_live_pid_on_this_host_is_never_stale_however_old_its_heartbeat(tmp_path):
    path = _write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), heartbeat=0.0, token="theirs")
    with pytest.raises(WorkdirBusy, match=f"in use by PID {os.getppid()}"):
        WorkdirLock(str(tmp_path)).acquire()
    assert json.load(open(path))["token"] == "theirs"  # untouched


def test_a_paused_holder_keeps_its_lock(tmp_path):
    """A holder stopped (SIGSTOP) past the stale time is alive: the second launch is refused, not let in."""
    code = ("import sys, time; from kdjax.workdir import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        record = json.load(open(tmp_path / LOCK_FILE))
        record["heartbeat"] = time.time() - 10 * workdir_lib.STALE_AFTER_S  # as if paused for well over an hour
        (tmp_path / LOCK_FILE).write_text(json.dumps(record))
        with pytest.raises(WorkdirBusy, match=f"PID {holder.pid}"):
            WorkdirLock(str(tmp_path)).acquire()
        assert json.load(open(tmp_path / LOCK_FILE))["pid"] == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()


def test_a_dead_holder_on_this_host_is_taken_over_and_the_line_says_why(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid, heartbeat=time.time(), token="theirs")
    with WorkdirLock(str(tmp_path)) as lock:
        assert json.load(open(tmp_path / LOCK_FILE))["token"] == lock.token
    err = capsys.readouterr().err
    assert f"PID {dead.pid} on {socket.gethostname()} is gone" in err and len(err.strip().splitlines()) == 1


def test_another_hosts_silent_holder_is_taken_over_without_claiming_its_pid_is_gone(tmp_path, capsys):
    """The reason given is the one that was checked: the heartbeat, not the PID (which cannot be seen from here)."""
    _write_lock(tmp_path, host="elsewhere", pid=os.getpid(), heartbeat=time.time() - 3600, token="theirs")
    with WorkdirLock(str(tmp_path)):
        pass
    err = capsys.readouterr().err
    assert "has not renewed it" in err and "is gone" not in err, err


@pytest.mark.parametrize("content", ['{"pid": "abc", "host": 3}', '[1, 2]', '"x"', '{"pid": null}', "{half"])
def test_a_malformed_lock_file_is_one_line_not_a_traceback(tmp_path, content, capsys):
    path = tmp_path / LOCK_FILE
    path.write_text(content)
    with pytest.raises(WorkdirBusy) as err:  # fresh: it may be a lock being written
        WorkdirLock(str(tmp_path)).acquire()
    assert "\n" not in str(err.value) and "None" not in str(err.value), str(err.value)
    old = time.time() - 60
    os.utime(path, (old, old))
    with WorkdirLock(str(tmp_path)):  # old: taken over, saying why
        pass
    err = capsys.readouterr().err
    assert "unreadable" in err and "PID None" not in err, err


def test_a_holder_that_lost_its_lock_writes_nothing(tmp_path):
    """Every write of a run is fenced by the lock's token: a holder whose lock another process took over stops
    before writing a metrics row, a checkpoint or results.json."""
    lock = WorkdirLock(str(tmp_path)).acquire()
    try:
        log = runlog.RunLog(str(tmp_path), total_steps=4)
        log.write(1, {"loss": 1.0})  # still ours
        ckpt = TrainCheckpointer(str(tmp_path))
        # another process takes the workdir over (this one was paused past the stale time on another host)
        _write_lock(tmp_path, host="elsewhere", pid=4242, heartbeat=time.time(), token="theirs")
        with pytest.raises(workdir_lib.LockLost, match="PID 4242 on elsewhere holds it now"):
            log.write(2, {"loss": 1.0})
        state = {"params": {"w": np.ones(3, np.float32)}, "step": np.int32(2)}
        with pytest.raises(workdir_lib.LockLost):
            ckpt.save(2, state, {"model": "m"})
        with pytest.raises(workdir_lib.LockLost):
            runlog.write_results(str(tmp_path), {"task": "teacher", "top1": 0.5})
        (tmp_path / LOCK_FILE).unlink()  # or the lock file is gone altogether
        with pytest.raises(workdir_lib.LockLost, match="lock file is gone"):
            log.write(3, {"loss": 1.0})
        ckpt.close()
    finally:
        lock.release()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "results.json").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_the_heartbeat_never_overwrites_a_new_holders_record(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lib, "HEARTBEAT_S", 0.01)
    lock = WorkdirLock(str(tmp_path)).acquire()
    try:
        _write_lock(tmp_path, host="elsewhere", pid=4242, heartbeat=1.0, token="theirs")
        lock._thread.join(timeout=10)  # the heartbeat sees the lock is no longer its own and ends
        assert not lock._thread.is_alive()
        assert json.load(open(tmp_path / LOCK_FILE))["token"] == "theirs"
    finally:
        lock.release()
    assert json.load(open(tmp_path / LOCK_FILE))["token"] == "theirs"  # release leaves another's lock alone


def test_a_requeued_slurm_job_never_takes_over_a_live_pid_on_its_host(tmp_path):
    """The requeue take-over follows the lock's rule: the previous incarnation's record names a PID alive here."""
    host, pid = socket.gethostname(), os.getppid()
    (tmp_path / slurm.STARTS).write_text(json.dumps({"job_id": "5_1", "restart": 0, "host": host, "pid": pid}) + "\n")
    _write_lock(tmp_path, host=host, pid=pid, heartbeat=0.0, token="theirs")
    assert not slurm.take_over_previous_incarnation(str(tmp_path), "5_1", 1, log=lambda line: None)
    assert (tmp_path / LOCK_FILE).exists()
    assert not slurm.clear_lock_of_ended_job(str(tmp_path), ["5_1"], [], log=lambda line: None)
    assert (tmp_path / LOCK_FILE).exists()

"""Nothing silently wrong: verified checkpoints, finished inputs only, locks, launches that claim nothing."""
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import launch_env, load_config
from kdjax import workdir as workdir_lib
from kdjax.checkpoint import CheckpointError, load_model, save_model
from kdjax.sweep import executor, grid
from kdjax.checkpoint import inputs as checkpoint_inputs
from kdjax.tasks import teacher


def _teacher(tmp_path, **fields):
    config = load_config("teacher", "model=tiny_cnn,dataset=synthetic,epochs=1,image_size=8,batch_size=32")
    config.dataset_options.num_train, config.dataset_options.num_test = 64, 32
    for key, value in fields.items():
        config[key] = value
    workdir = tmp_path / "teacher"
    teacher.run(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("t"))


def test_a_checkpoint_whose_arrays_changed_is_refused(trained, tmp_path):
    step_dir = next(p for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
    copy = tmp_path / "copy" / "checkpoints" / step_dir.name
    copy.parent.mkdir(parents=True)
    import shutil
    shutil.copytree(step_dir, copy)
    state = ocp.StandardCheckpointer().restore(str(copy / "state"))
    state["params"]["fc"]["bias"] = np.asarray(state["params"]["fc"]["bias"]) + 1e-3  # silent damage
    shutil.rmtree(copy / "state")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(copy / "state"), state)
    checkpointer.wait_until_finished()
    with pytest.raises(CheckpointError, match="corrupted: its arrays do not match the digest"):
        load_model(str(copy))
    variables, _ = load_model(str(step_dir))  # the original still verifies
    assert variables["params"]["fc"]["bias"].shape == (10,)


def test_flipped_bytes_never_load_silently(trained, tmp_path):
    import shutil
    copy = tmp_path / "flipped"
    shutil.copytree(trained, copy)
    step_dir = next(p for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_model(str(copy))


def test_an_unfinished_run_is_not_consumed(trained, tmp_path):
    import shutil
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained, unfinished)
    os.remove(unfinished / "results.json")
    with pytest.raises(CheckpointError, match="unfinished.*--config.teacher_checkpoint=.*checkpoints"):
        checkpoint_inputs.load_checkpoint(str(unfinished), "tiny_cnn", "teacher")
    step_dir = next(p for p in (unfinished / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoint_inputs.load_checkpoint(str(step_dir), "tiny_cnn", "teacher")[2] == "tiny_cnn"  # an explicit step


def test_a_sweep_reruns_a_run_whose_input_changed(tmp_path):
    model_dir = tmp_path / "t"
    save_model(str(model_dir / "checkpoints"), {"params": {"w": np.ones(3, np.float32)}, "batch_stats": {}},
               {"model": "tiny_cnn"})
    (model_dir / "results.json").write_text("{}")
    run = grid.Run("distill", str(tmp_path / "student"), (), stage=0)
    os.makedirs(run.workdir)
    record = checkpoint_inputs.input_record(str(model_dir), {"digest": "not-the-digest"})
    pathlib.Path(run.workdir, "results.json").write_text(json.dumps({"inputs": {"teacher": record}}))
    assert run.done and executor.stale(run)
    executor.set_aside(run, log=lambda line: None)
    assert not run.done and (tmp_path / "student.stale-1" / "results.json").exists()


@pytest.mark.parametrize("field, value", [("epochs", 0), ("keep_checkpoints", 0), ("batch_size", -1),
                                          ("eval_batch_size", 0)])
def test_counts_below_one_are_refused_before_anything_loads(tmp_path, field, value):
    config = load_config("teacher", "model=tiny_cnn,dataset=digits")
    config[field] = value
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        teacher.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "run_config.json").exists()


def test_an_image_size_an_architecture_cannot_run_at_is_one_line(tmp_path):
    config = load_config("teacher", "model=vgg8,dataset=digits,image_size=7")
    with pytest.raises(ValueError, match="model vgg8 cannot run at 7x7 pixels"):
        teacher.run(config, str(tmp_path / "w"))


def test_a_second_process_is_refused_and_a_dead_holder_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kdjax.workdir import WorkdirLock; "
                               "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, env=launch_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by PID {holder.pid} on"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.WorkdirLock(str(tmp_path)):  # the PID is gone: stale, taken over
        assert json.loads((tmp_path / workdir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / workdir_lib.LOCK_FILE).exists()
    # an old heartbeat from another host is stale too
    (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1,
                                                              "heartbeat": time.time() - 3600}))
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass


def test_a_refused_launch_claims_nothing(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "kdjax", "teacher", "--config.model=resnet8",
                           f"--config.data_dir={tmp_path / 'none'}", f"--config.manual_dir={tmp_path / 'none'}",
                           f"--workdir={workdir}"], env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    leftovers = {p.name for p in workdir.iterdir()} if workdir.exists() else set()
    assert not leftovers & {"run_config.json", "config.json", "checkpoints"}, leftovers


def test_a_failed_save_is_one_line_naming_the_intact_step(tmp_path, monkeypatch):
    from kdjax.checkpoint.store import TrainCheckpointer
    saves = []
    original = TrainCheckpointer.save

    def save(self, step, state, meta):
        if saves:
            raise OSError(28, "No space left on device")
        saves.append(step)
        return original(self, step, state, meta)

    monkeypatch.setattr(TrainCheckpointer, "save", save)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step \d+ .*No space left on device.*"
                                              r"step \d+ is intact: free space and run the same command"):
        _teacher(tmp_path, epochs=2, checkpoint_every=1)
    assert len(saves) == 1


def test_a_resume_from_a_corrupted_step_names_the_steps_that_verify(tmp_path):
    import shutil
    workdir = _teacher(tmp_path, epochs=2, checkpoint_every=1)
    os.remove(workdir / "run_config.json")  # a longer run of the same workdir, so that it resumes
    os.remove(workdir / "results.json")
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    last = workdir / "checkpoints" / str(steps[-1])
    state = ocp.StandardCheckpointer().restore(str(last / "state"))
    state["params"]["fc"]["bias"] = np.asarray(state["params"]["fc"]["bias"]) + 1e-3
    shutil.rmtree(last / "state")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(last / "state"), state)
    checkpointer.wait_until_finished()
    with pytest.raises(CheckpointError, match=rf"checkpoints/{steps[-1]} is corrupted.*earlier steps that verify: "
                                              rf"{steps[0]}\)"):
        _teacher(tmp_path, epochs=3, checkpoint_every=1)


def test_an_unwritable_workdir_is_one_line_at_the_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = load_config("teacher", "model=tiny_cnn,dataset=digits,image_size=8")
    with pytest.raises(ValueError, match="is not writable.*choose another --workdir"):
        teacher.run(config, str(blocker / "w"))

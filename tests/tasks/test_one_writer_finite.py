"""At the task level: a task never writes into another task's workdir, a refused launch
claims nothing, a resumed run consumes the inputs it started with, and numbers that are not numbers are never
saved, loaded or written as a finished result."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import load_config
from kdjax import runlog
from kdjax.checkpoint import CheckpointError, load_model, read_meta, save_model, store
from kdjax.tasks import distill, evaluate, import_torch, teacher, tstddev
from kdjax.train import steps
from kdjax.train.loop import TrainingDiverged

TINY = "model=tiny_cnn,dataset=synthetic,epochs=1,image_size=8,batch_size=32"


def _teacher_config(**fields):
    config = load_config("teacher", TINY)
    config.dataset_options.num_train, config.dataset_options.num_test = 64, 32
    for key, value in fields.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("t") / "teacher"
    teacher.run(_teacher_config(), str(workdir))
    return workdir


def _snapshot(workdir):
    return {name: (workdir / name).read_bytes() for name in ("results.json", "config.json", "run_config.json")}


def _nan_checkpoint(directory, monkeypatch, meta=None):
    """A checkpoint holding a NaN weight, written past the save-time check (as an older kdjax could)."""
    variables, old_meta = load_model(str(directory))
    variables["params"]["fc"]["kernel"] = np.asarray(variables["params"]["fc"]["kernel"]).copy()
    variables["params"]["fc"]["kernel"][0, 0] = np.nan
    with monkeypatch.context() as m:
        m.setattr(store, "check_finite", lambda *args: None)
        save_model(str(directory / "nan" / "checkpoints"), variables, meta or old_meta)
    (directory / "nan" / "results.json").write_text(json.dumps({"task": "teacher"}))
    return directory / "nan"


# ------------------------------------------------------------------------------------------ section 3


def test_evaluate_never_writes_into_a_teachers_workdir(trained):
    before = _snapshot(trained)
    config = load_config("evaluate")
    config.checkpoint = str(trained)
    with pytest.raises(ValueError, match="holds a teacher run; an evaluate run never writes into another task's"):
        evaluate.run(config, str(trained))
    assert _snapshot(trained) == before


def test_import_torch_never_writes_into_a_teachers_workdir(trained):
    before = _snapshot(trained)
    steps_before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    config = load_config("import_torch", "model=resnet8")
    config.source = "unused.pth"
    with pytest.raises(ValueError, match="holds a teacher run"):
        import_torch.run(config, str(trained))
    assert _snapshot(trained) == before
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == steps_before


def test_a_batch_larger_than_the_dataset_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match="fewer than one batch of 128"):
        teacher.run(_teacher_config(batch_size=128), str(workdir))
    assert not (workdir / "config.json").exists() and not (workdir / "run_config.json").exists()
    out = teacher.run(_teacher_config(), str(workdir))  # the corrected command is not "a different config"
    assert np.isfinite(out["test_loss"])


def test_a_resumed_student_refuses_a_teacher_that_changed_under_it(trained, tmp_path):
    """The student started with one teacher; the teacher's checkpoint (same path) was replaced before the student
    resumed: resuming would mix two teachers while naming one."""
    own = tmp_path / "teacher"
    shutil.copytree(trained, own)
    config = load_config("distill", "teacher=tiny_cnn,student=tiny_cnn,aug=cutmix,dataset=synthetic,epochs=1,"
                                    "image_size=8,batch_size=32")
    config.dataset_options.num_train, config.dataset_options.num_test = 64, 32
    config.teacher_checkpoint = str(own)
    student = tmp_path / "student"
    distill.run(config, str(student))
    (student / "results.json").unlink()  # as if it had been stopped before its end
    variables, meta = load_model(str(own))
    variables = jax.tree.map(lambda a: np.asarray(a) * 1.01, variables)
    shutil.rmtree(own / "checkpoints")
    save_model(str(own / "checkpoints"), variables, {k: v for k, v in meta.items() if "digest" not in k})
    with pytest.raises(ValueError, match="started with other inputs .*teacher"):
        distill.run(config, str(student))
    assert not (student / "results.json").exists()


# ------------------------------------------------------------------------------------------ section 4


@pytest.mark.parametrize("part, message", [
    ("opt_state", r"the state became non-finite by step 2 \(epoch 1\): opt_state/"),
    ("params", r"the evaluation of epoch 1 is non-finite \(test_loss nan\)")])
def test_a_state_that_is_not_finite_is_never_saved_nor_written_as_a_result(tmp_path, monkeypatch, part, message):
    """The training loss stays finite while the state overflows in its last step (a huge lr): the evaluation and
    the state are checked before the save, and nothing is written as finished."""
    make = steps.make_ce_step

    def overflowing(*args, **kwargs):
        step = make(*args, **kwargs)

        def wrapped(state, teacher_vars, batch, key):
            state, metrics = step(state, teacher_vars, batch, key)  # the loss was computed before the update
            last = state["step"] >= 2
            broken = jax.tree.map(lambda a: jnp.where(last, a * jnp.inf, a)
                                  if jnp.issubdtype(a.dtype, jnp.inexact) else a, state[part])
            return dict(state, **{part: broken}), metrics
        return wrapped

    monkeypatch.setattr(steps, "make_ce_step", overflowing)
    workdir = tmp_path / "w"
    with pytest.raises(TrainingDiverged, match=message):
        teacher.run(_teacher_config(), str(workdir))
    assert not (workdir / "results.json").exists()
    assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_non_finite_figure_is_never_written_as_finished(tmp_path):
    with pytest.raises(runlog.NonFiniteResult, match="test_loss of the run in .* is nan"):
        runlog.write_results(str(tmp_path), {"task": "teacher", "test_loss": float("nan"), "top1": 0.1})
    assert not (tmp_path / "results.json").exists()


def test_a_non_finite_state_is_refused_at_save_naming_the_first_bad_array(tmp_path):
    variables = {"params": {"a": np.ones(2, np.float32), "b": np.array([1.0, np.inf, np.nan], np.float32)},
                 "batch_stats": {}}
    with pytest.raises(CheckpointError, match=r"non-finite values: params/b \(1 NaN, 1 inf of 3\)"):
        save_model(str(tmp_path / "checkpoints"), variables, {"model": "tiny_cnn"})


def test_evaluate_and_tstddev_refuse_a_teacher_with_nan_weights(trained, monkeypatch, tmp_path):
    nan_dir = _nan_checkpoint(trained, monkeypatch)
    try:
        with pytest.raises(CheckpointError, match="non-finite values: params/fc/kernel .1 NaN"):
            load_model(str(nan_dir))
        config = load_config("evaluate")
        config.checkpoint = str(nan_dir)
        with pytest.raises(CheckpointError, match="params/fc/kernel") as err:
            evaluate.run(config, str(tmp_path / "eval"))
        assert "\n" not in str(err.value)
        assert not (tmp_path / "eval" / "results.json").exists()
        config = load_config("tstddev", "teacher=tiny_cnn,aug=cutmix,dataset=synthetic,image_size=8")
        config.teacher_checkpoint = str(nan_dir)
        with pytest.raises(CheckpointError, match="params/fc/kernel"):
            tstddev.run(config, str(tmp_path / "tstd"))
        assert not (tmp_path / "tstd" / "results.json").exists()
    finally:
        shutil.rmtree(nan_dir)


def test_import_torch_refuses_nan_weights(trained, tmp_path, monkeypatch):
    variables, _ = load_model(str(trained))
    variables["params"]["fc"]["bias"] = np.full_like(variables["params"]["fc"]["bias"], np.nan)
    from kdjax.checkpoint import torch_import
    monkeypatch.setattr(torch_import, "read_torch_checkpoint", lambda source: ({}, {}))
    monkeypatch.setattr(torch_import, "torch_to_variables", lambda *args, **kwargs: variables)
    (tmp_path / "t.pth").write_bytes(b"stands for a .pth file")
    config = load_config("import_torch", "model=tiny_cnn")
    config.source, config.num_classes, config.image_size = str(tmp_path / "t.pth"), 10, 8
    with pytest.raises(CheckpointError, match=r"non-finite values: params/fc/bias \(10 NaN"):
        import_torch.run(config, str(tmp_path / "imported"))
    assert not (tmp_path / "imported" / "results.json").exists()


def test_checkpoint_meta_is_covered_by_its_digest(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    step_dir = next(p for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["num_classes"] = 100  # silent damage to what the checks trust
    meta_file.write_text(json.dumps(meta))
    for read in (read_meta, load_model):
        with pytest.raises(CheckpointError, match="its meta .* does not match the digest"):
            read(str(copy))
    assert read_meta(str(trained))["num_classes"] == 10  # the original verifies

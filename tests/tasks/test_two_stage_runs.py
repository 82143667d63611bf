"""Two-stage distillers end to end (resnet8 pair, synthetic 8 px data): the init stage is part of the run, written
to ``<workdir>/init_stage`` and reported; the KD stage starts from its result; a run killed with SIGKILL in either
stage resumes to the bit-identical final state of an uninterrupted run."""
import json

import jax
import numpy as np
import pytest

from helpers import kill_after, launch, load_config, spawn

DATA = ["--config.dataset=synthetic", "--config.dataset_options.num_train=320",
        "--config.dataset_options.num_test=64", "--config.dataset_options.num_classes=10",
        "--config.image_size=8", "--config.batch_size=32"]
STEPS_PER_EPOCH = 10  # 320 / 32
RUN = DATA + ["--config.teacher=resnet8", "--config.student=resnet8", "--config.aug=flip", "--config.epochs=2",
              "--config.distill.init_epochs=2", "--config.checkpoint_every=1", "--config.steps_per_dispatch=1",
              "--config.keep_checkpoints=4"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    launch("teacher.py:model=resnet8,epochs=1", workdir, *DATA, "--config.steps_per_dispatch=16")
    return workdir


def _final_state(workdir):
    from kdjax.checkpoint import load_model
    variables, _ = load_model(str(workdir))
    return jax.tree.leaves(variables)


@pytest.mark.slow  # three runs of two stages, two of them killed and resumed: ~3.5 min on 2 cores
def test_fsp_run_reports_its_init_stage_and_resumes_after_sigkill_in_either_stage(teacher_dir, tmp_path):
    args = ["--config.distiller=fsp", f"--config.teacher_checkpoint={teacher_dir}"]
    straight = tmp_path / "straight"
    launch("distill.py", straight, *RUN, *args)
    results = json.loads((straight / "results.json").read_text())
    stage = results["init_stage"]
    assert stage["epochs"] == 2 and stage["lr"] == 0.05 and stage["trains"] == ["heads", "student feature modules"]
    assert np.isfinite(stage["train_loss"]) and 0 <= stage["top1"] <= 1
    assert (straight / "init_stage" / "checkpoints" / str(2 * STEPS_PER_EPOCH)).is_dir()
    assert results["loss_weights"] == {"gamma": 0.1, "alpha": 0.9, "beta": 50.0}

    for stage_dir in ("init_stage/checkpoints", "checkpoints"):  # a kill in the init stage, then in the KD stage
        workdir = tmp_path / stage_dir.split("/")[0]
        kill_after(spawn("distill.py", workdir, *RUN, *args),
                    workdir / stage_dir / str(STEPS_PER_EPOCH) / "commit_success.txt")
        assert not (workdir / "results.json").exists()
        resumed = launch("distill.py", workdir, *RUN, *args)
        assert "resuming from step" in resumed.stdout
        for a, b in zip(_final_state(straight), _final_state(workdir)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert json.loads((workdir / "results.json").read_text())["init_stage"]["train_loss"] == stage["train_loss"]


def test_kd_stage_starts_from_the_init_stage_with_a_new_optimiser(teacher_dir, tmp_path, monkeypatch):
    """In this process: the state ``fit`` receives for the KD stage holds the init stage's final student and,
    for ft, the trained paraphraser as fixed state beside a new translator."""
    from kdjax.tasks import distill
    from kdjax.train import loop
    seen = []
    real_fit = loop.fit

    def recording_fit(workdir, bookkeeping, recipe, trainee, data, mesh):
        start = jax.device_get(trainee.state)  # before fit donates its buffers
        out = real_fit(workdir, bookkeeping, recipe, trainee, data, mesh)
        seen.append((trainee.name, start, jax.device_get(out["state"])))
        return out
    monkeypatch.setattr(loop, "fit", recording_fit)
    config = load_config("distill", "teacher=resnet8,student=resnet8,aug=flip,epochs=1,distiller=ft")
    for arg in DATA + ["--config.distill.init_epochs=1", "--config.steps_per_dispatch=16",
                       f"--config.teacher_checkpoint={teacher_dir}"]:
        key, value = arg[len("--config."):].split("=", 1)
        from kdjax.configs.parse import set_field
        set_field(config, key, value)
    results = distill.run(config, str(tmp_path / "ft"))
    assert [name for name, _, _ in seen] == ["distill:init", "distill"]
    (_, stage_start, stage_end), (_, kd_start, _) = seen
    for a, b in zip(jax.tree.leaves(stage_end["params"]), jax.tree.leaves(kd_start["params"])):
        np.testing.assert_array_equal(a, b)
    # ft trains no student parameter in its init stage, only the paraphraser
    for a, b in zip(jax.tree.leaves(stage_start["params"]), jax.tree.leaves(stage_end["params"])):
        np.testing.assert_array_equal(a, b)
    trained = jax.tree.leaves(stage_end["extra"]["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stage_start["extra"]["params"]), trained))
    fixed = jax.tree.leaves(kd_start["extra"]["state"])
    assert all(any(np.array_equal(p, f) for f in fixed if f.shape == p.shape) for p in trained)
    assert all(not np.any(np.asarray(m)) for m in jax.tree.leaves(kd_start["opt_state"]) if np.ndim(m))  # fresh
    assert results["init_stage"]["lr"] == 0.01  # pretrain.py: 0.01 for FT on CIFAR ResNet students

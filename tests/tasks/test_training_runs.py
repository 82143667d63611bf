"""End-to-end training through launch.py on digits with a tiny model: teacher, KD with every scheme, resume after
SIGKILL, device-count independence, two processes, and the one-line errors."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import kill_after, launch, load_config, spawn

TINY = ["--config.image_size=8", "--config.batch_size=32", "--config.steps_per_dispatch=64"]


def read_losses(workdir):
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    launch("teacher.py:model=tiny_cnn,dataset=digits,epochs=2", workdir, *TINY, "--config.optim.lr=0.1")
    return workdir


def test_teacher_run_writes_results_checkpoint_and_learns(teacher_dir):
    results = json.loads((teacher_dir / "results.json").read_text())
    assert results["task"] == "teacher" and results["model"] == "tiny_cnn" and results["epochs"] == 2
    assert 0.0 <= results["top5"] <= 1.0 and results["top1"] > 0.3  # 10 classes: chance is 0.1
    assert results["test_loss"] < np.log(10)
    for field in ("wall_s", "images_per_s", "device_kind", "versions", "config"):
        assert field in results
    steps = [s for s, _ in read_losses(teacher_dir)]
    assert steps[-1] == 2 * (44 + 1)  # 1438 images: 44 full batches of 32 and the short last batch, per epoch
    assert (teacher_dir / "checkpoints" / str(steps[-1]) / "meta").is_dir()


def tiny_distill_config(aug, teacher_dir, **fields):
    config = load_config("distill", f"teacher=tiny_cnn,student=tiny_cnn,dataset=digits,epochs=1,aug={aug},"
                                    "last_batch=drop,image_size=8,batch_size=32,steps_per_dispatch=64")
    config.teacher_checkpoint = str(teacher_dir)
    for key, value in fields.items():
        config[key] = value
    return config


@pytest.mark.slow  # ~1 min: every scheme through launch.py; the step tests check each scheme in process
def test_kd_runs_for_every_scheme(teacher_dir, tmp_path):
    """The nine schemes and a labels-only student, one epoch each, in this one process (no start-up per run)."""
    from kdjax import augment
    from kdjax.tasks import distill
    runs = [(aug, "tiny_cnn") for aug in augment.names()[:9]] + [("cutmix", "none")]
    for aug, teacher in runs:
        workdir = tmp_path / f"{teacher}-{aug}"
        results = distill.run(tiny_distill_config(aug, teacher_dir, teacher=teacher), str(workdir))
        assert results == {k: v for k, v in json.loads((workdir / "results.json").read_text()).items()
                           if k in results}
        assert results["aug"] == aug and results["teacher"] == teacher and np.isfinite(results["test_loss"])
        assert all(np.isfinite(loss) for _, loss in read_losses(workdir))
        assert 0.0 <= results["top1"] <= results["top5"] <= 1.0


def test_scheme_switch_trains_the_very_run_of_the_scheme_alone(teacher_dir, tmp_path):
    """scheme_switch=true (one program for seven schemes, the scheme picked by data) trains bit for bit the run the
    scheme's own program trains: every step's loss, the evaluation and the final parameters, the short last batch's
    program (30 rows) included."""
    from kdjax.checkpoint import load_model
    from kdjax.tasks import distill
    out = {}
    for switch in (False, True):
        workdir = tmp_path / f"switch_{switch}"
        config = tiny_distill_config("mixup", teacher_dir, last_batch="keep", scheme_switch=switch)
        out[switch] = distill.run(config, str(workdir)), read_losses(workdir), load_model(str(workdir))[0]
        record = json.loads((workdir / "results.json").read_text())
        assert record["config"]["scheme_switch"] is switch
        assert record["scheme_program"] == ("switch" if switch else "own")
    (alone, losses_alone, params_alone), (switched, losses_switched, params_switched) = out[False], out[True]
    assert losses_switched == losses_alone and losses_alone[-1][0] == 45  # 44 batches of 32 and one of 30
    assert {k: switched[k] for k in ("test_loss", "top1", "top5")} == {k: alone[k] for k in ("test_loss", "top1",
                                                                                             "top5")}
    for a, b in zip(jax.tree.leaves(params_alone), jax.tree.leaves(params_switched)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


RESUME = ["--config.image_size=8", "--config.batch_size=32", "--config.steps_per_dispatch=4",
          "--config.checkpoint_every=1"]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    """Kill a run with SIGKILL at an arbitrary step after its first checkpoint, resume it: the final parameters
    equal an uninterrupted run's."""
    import re
    from kdjax.checkpoint import load_model
    config = "teacher.py:model=tiny_cnn,dataset=digits,epochs=6"
    launch(config, tmp_path / "straight", *RESUME)

    interrupted = tmp_path / "interrupted"
    # killed somewhere after the first checkpoint, up to 0.1 s later (a later epoch)
    kill_after(spawn(config, interrupted, *RESUME), interrupted / "checkpoints" / "45" / "commit_success.txt",
               jitter=0.1)
    assert not (interrupted / "results.json").exists()
    resumed = launch(config, interrupted, *RESUME)
    step = int(re.search(r"resuming from step (\d+)", resumed.stdout).group(1))
    assert step % 45 == 0 and 45 <= step < 6 * 45

    want, _ = load_model(str(tmp_path / "straight"))
    got, _ = load_model(str(interrupted))
    for a, b in zip(jax_leaves(want), jax_leaves(got)):
        np.testing.assert_array_equal(a, b)
    assert json.loads((interrupted / "results.json").read_text())["test_loss"] == \
        json.loads((tmp_path / "straight" / "results.json").read_text())["test_loss"]


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


DEVICE_RUN = ("distill.py:teacher=none,student=tiny_cnn,dataset=synthetic,epochs=1,aug=cutmix_pick_s,"
              "batch_size=32,image_size=8,steps_per_dispatch=1",
              "--config.dataset_options.num_train=640", "--config.dataset_options.num_test=64",
              "--config.dataset_options.num_classes=10")


@pytest.mark.slow  # ~30 s: 8 fake devices end to end; the data and augment tests cover 8 devices in process
def test_loss_trajectory_does_not_depend_on_device_count(tmp_path):
    launch(*DEVICE_RUN[:1], tmp_path / "one", *DEVICE_RUN[1:], devices=1)
    launch(*DEVICE_RUN[:1], tmp_path / "eight", *DEVICE_RUN[1:], devices=8)
    one, eight = read_losses(tmp_path / "one"), read_losses(tmp_path / "eight")
    assert [s for s, _ in one] == [s for s, _ in eight] == list(range(1, 21))
    np.testing.assert_allclose([v for _, v in eight], [v for _, v in one], rtol=1e-5, atol=1e-5)


def test_two_processes_match_one(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "two"
    procs = [spawn(*DEVICE_RUN[:1], workdir, *DEVICE_RUN[1:], KDJAX_COORDINATOR=f"127.0.0.1:{port}",
                   KDJAX_NUM_PROCESSES="2", KDJAX_PROCESS_ID=str(i), KDJAX_CPU_COLLECTIVES="gloo")
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    launch(*DEVICE_RUN[:1], tmp_path / "one", *DEVICE_RUN[1:], devices=2)
    np.testing.assert_allclose([v for _, v in read_losses(workdir)], [v for _, v in read_losses(tmp_path / "one")],
                               rtol=1e-5, atol=1e-5)
    two = json.loads((workdir / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)


def test_bad_inputs_give_one_line_errors(teacher_dir, tmp_path):
    from kdjax.checkpoint import CheckpointError
    from kdjax.tasks import distill, teacher
    from kdjax.train.loop import TrainingDiverged

    proc = launch("teacher.py:model=resnet9,dataset=digits", tmp_path / "bad", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown model 'resnet9'; valid models:")

    with pytest.raises(ValueError, match="unknown augmentation 'cutmax'"):
        distill.run(tiny_distill_config("cutmax", teacher_dir), str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="does not exist"):
        distill.run(tiny_distill_config("flip", tmp_path / "nowhere"), str(tmp_path / "b"))
    with pytest.raises(CheckpointError, match="is for model='tiny_cnn'"):
        distill.run(tiny_distill_config("flip", teacher_dir, teacher="resnet8"), str(tmp_path / "c"))

    wrong_classes = tmp_path / "wrong_classes"
    shutil.copytree(teacher_dir / "checkpoints", wrong_classes)
    meta_file = next(wrong_classes.glob("*/meta/metadata"))
    meta = json.loads(meta_file.read_text())
    meta = dict(meta, num_classes=100)
    from kdjax.checkpoint.store import meta_digest
    meta_file.write_text(json.dumps(dict(meta, meta_digest=meta_digest(meta))))  # a checkpoint made for 100 classes
    with pytest.raises(CheckpointError, match="num_classes=100"):
        distill.run(tiny_distill_config("flip", wrong_classes), str(tmp_path / "d"))

    damaged = tmp_path / "damaged"
    shutil.copytree(teacher_dir / "checkpoints", damaged)
    for f in next(damaged.glob("*/state")).rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)
    with pytest.raises(CheckpointError, match="damaged"):
        distill.run(tiny_distill_config("flip", damaged), str(tmp_path / "e"))

    config = load_config("teacher", "model=tiny_cnn,dataset=digits,epochs=2,seed=1,image_size=8,batch_size=32,"
                                    "steps_per_dispatch=64")
    with pytest.raises(ValueError, match=r"different config \(.*seed: 0 -> 1"):
        teacher.run(config, str(teacher_dir))  # the finished run and its results stay as they were
    assert json.loads((teacher_dir / "results.json").read_text())["seed"] == 0

    config = load_config("teacher", "model=tiny_cnn,dataset=digits,epochs=1,image_size=8,batch_size=32,"
                                    "steps_per_dispatch=8")
    config.optim.lr = 1e12
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step \d+ \(epoch 1\)"):
        teacher.run(config, str(tmp_path / "diverged"))
    assert not (tmp_path / "diverged" / "results.json").exists()


def test_a_run_builds_its_distiller_once(teacher_dir, tmp_path, monkeypatch):
    """kdjax.train.kd.KDMethod is built once, at the checks, and the run uses that object: the distiller
    (here CC's, whose embedding heads are sized from the models' feature shapes) is constructed exactly once per run.
    The teacher's architecture is left unset: it is the one its checkpoint names."""
    from kdjax import distillers
    from kdjax.tasks import distill
    built = []
    create = distillers.create
    monkeypatch.setattr(distillers, "create", lambda name, **options: built.append(name) or create(name, **options))
    results = distill.run(tiny_distill_config("flip", teacher_dir, distiller="cc", teacher=None), str(tmp_path / "s"))
    assert built == ["cc"] and results["distiller"] == "cc" and np.isfinite(results["test_loss"])
    assert results["teacher"] == "tiny_cnn"

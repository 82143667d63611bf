"""``kdjax teacher`` / ``distill`` on a streamed dataset (fabricated ILSVRC tars of 5 classes, 16 px, tiny_cnn):
the training loop's streamed branch, its masked evaluation, checkpoints inside an epoch and exact resumption from
them; the on-device path keeps refusing both."""
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

import streamed_inputs as fab
import tiny_models  # noqa: F401  (registers tiny_cnn)
from helpers import kill_after, launch, load_config, spawn
from kdjax.data.streamed import prepare_dataset

SIZE = 16
# 30 train images at batch 8: 3 full steps and a short one of 6 per epoch; a checkpoint every 3 steps falls inside
# the first epoch (step 3) and the second (step 6)
TEACHER = "model=tiny_cnn,dataset=imagenet,epochs=2,image_size=16,batch_size=8,eval_batch_size=4,keep_checkpoints=9"
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("streamed_runs")
    fab.write_tars(base / "manual", fab.make_images(seed=3))
    prepare_dataset("imagenet", base / "manual", base / "data", classes=fab.classes(), records_per_shard=16,
                    workers=1, progress_every=0)
    return base / "data"


def teacher_config(data_dir, arg=TEACHER, **fields):
    config = load_config("teacher", arg)
    config.data_dir = str(data_dir)
    for key, value in fields.items():
        config[key] = value
    return config


def digests(workdir) -> dict:
    """step -> the SHA-256 of the checkpoint's arrays (kdjax.checkpoint.store.state_digest, in its meta)."""
    return {int(step.name): json.loads((step / "meta" / "metadata").read_text())["digest"]
            for step in pathlib.Path(workdir, "checkpoints").iterdir() if step.name.isdigit()}


def losses(workdir) -> list:
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted streamed teacher run with a checkpoint every 3 steps."""
    from kdjax.tasks import teacher
    workdir = tmp_path_factory.mktemp("straight")
    teacher.run(teacher_config(data_dir, checkpoint_every_steps=3), str(workdir))
    return workdir


def test_a_streamed_teacher_run_trains_saves_inside_epochs_and_evaluates_every_test_image(straight, data_dir):
    results = json.loads((straight / "results.json").read_text())
    assert results["dataset"] == "imagenet" and results["epochs"] == 2
    assert [s for s, _ in losses(straight)] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(np.isfinite(v) for _, v in losses(straight))
    assert sorted(digests(straight)) == [3, 6, 8]  # every 3 steps, and the last step
    # the last evaluation batch is padded (10 test images, batches of 4) and masked: it equals one unpadded batch
    from kdjax import models, parallel
    from kdjax.checkpoint import load_model
    from kdjax.data import open_for
    from kdjax.train.evaluate import make_evaluator
    variables, _ = load_model(str(straight))
    dataset = open_for(teacher_config(data_dir))
    assert dataset.num_test == 10 and dataset.image_size == SIZE
    model, mesh = models.create("tiny_cnn", 5, SIZE), parallel.make_mesh()
    padded = make_evaluator(model, dataset.mean, dataset.std, 4, 10, mesh)(variables, dataset)
    whole = make_evaluator(model, dataset.mean, dataset.std, 10, 10, mesh)(variables, dataset)
    assert padded == pytest.approx(whole, rel=1e-6)
    assert padded["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    assert padded["top1"] == results["top1"] and 0 <= results["top1"] <= results["top5"] <= 1


@pytest.mark.parametrize("stop", [3, 6])
def test_resumed_from_a_checkpoint_inside_an_epoch_ends_as_the_uninterrupted_run(straight, data_dir, tmp_path,
                                                                                stop):
    """The run stopped after ``stop`` steps (its workdir as a kill there leaves it: the checkpoints up to that
    step, the log rows of later steps replayed) and run again ends with the same checkpoints, bit for bit."""
    from kdjax.tasks import teacher
    workdir = tmp_path / "stopped"
    shutil.copytree(straight, workdir)
    for step in digests(workdir):
        if step > stop:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    (workdir / "results.json").unlink()
    teacher.run(teacher_config(data_dir, checkpoint_every_steps=3), str(workdir))
    assert digests(workdir) == digests(straight)
    assert losses(workdir) == losses(straight)
    # a resumed run that restarted its epoch from the beginning would have trained on other batches
    assert stop % STEPS_PER_EPOCH


def test_checkpoint_every_steps_is_refused_for_in_memory_datasets_and_a_placement_that_does_not_exist(
        straight, data_dir, tmp_path):
    from kdjax.tasks import distill, teacher
    with pytest.raises(ValueError, match="checkpoint_every_steps applies to the streamed datasets"):
        teacher.run(teacher_config(data_dir, "model=tiny_cnn,dataset=digits,epochs=1",
                                   checkpoint_every_steps=5), str(tmp_path / "digits"))
    config = load_config("distill", "student=tiny_cnn")
    config.teacher_checkpoint, config.data_dir, config.placement = str(straight), str(data_dir), "device"
    with pytest.raises(ValueError, match="placement=device: imagenet is read from prepared JPEG records"):
        distill.run(config, str(tmp_path / "device"))
    assert not (tmp_path / "device").exists()
    with pytest.raises(ValueError, match="checkpoint_every_steps must be >= 1"):
        teacher.run(teacher_config(data_dir, checkpoint_every_steps=0), str(tmp_path / "zero"))
    assert not (tmp_path / "digits").exists() or not any((tmp_path / "digits").iterdir())


@pytest.mark.slow  # ~50 s: three launches through launch.py
def test_sigkill_inside_an_epoch_and_resume_is_bit_identical(data_dir, tmp_path):
    config = f"teacher.py:{TEACHER},epochs=3"
    args = [f"--config.data_dir={data_dir}", "--config.checkpoint_every_steps=3"]
    launch(config, tmp_path / "straight", *args)
    interrupted = tmp_path / "interrupted"
    kill_after(spawn(config, interrupted, *args), interrupted / "checkpoints" / "3" / "commit_success.txt")
    assert not (interrupted / "results.json").exists()
    resumed = launch(config, interrupted, *args)
    step = int(re.search(r"resuming from step (\d+)", resumed.stdout).group(1))
    assert step >= 3 and step < 12
    assert digests(interrupted)[12] == digests(tmp_path / "straight")[12]
    assert losses(interrupted) == losses(tmp_path / "straight")


@pytest.mark.slow  # ~20 s: three launches, two of them one run over two processes (gloo)
def test_two_processes_read_their_shares_and_match_one(data_dir, tmp_path):
    """Each process reads its half of every global batch (train and evaluation); the per-step losses and the
    evaluation equal one process's over the same two devices."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config, args = f"teacher.py:{TEACHER}", [f"--config.data_dir={data_dir}"]
    procs = [spawn(config, tmp_path / "two", *args, KDJAX_COORDINATOR=f"127.0.0.1:{port}", KDJAX_NUM_PROCESSES="2",
                   KDJAX_PROCESS_ID=str(i), KDJAX_CPU_COLLECTIVES="gloo") for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    assert "streamed on 2 x cpu" in outputs[0]
    launch(config, tmp_path / "one", *args, devices=2)
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=1e-5, atol=1e-5)
    two, one = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("two", "one"))
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5) and two["top1"] == one["top1"]

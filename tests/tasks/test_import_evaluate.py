"""The import task writes a kdjax checkpoint that the other tasks accept: logits survive the round trip, and the
evaluate task reports the accuracy stored by the original."""
import json

import numpy as np
import pytest

from helpers import load_config
from kdjax import models
from kdjax.checkpoint import CheckpointError, load_model, read_torch_checkpoint


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from conftest import FIXTURES
    from kdjax.tasks import import_torch
    workdir = tmp_path_factory.mktemp("imported")
    config = load_config("import_torch", "model=resnet8")
    config.source = str(FIXTURES / "resnet8_c100_s32_legacy.pth")
    import_torch.run(config, str(workdir))
    return workdir, FIXTURES


def test_imported_checkpoint_reproduces_the_original_logits(imported):
    workdir, fixtures = imported
    variables, meta = load_model(str(workdir))
    _, info = read_torch_checkpoint(fixtures / "resnet8_c100_s32_legacy.pth")
    assert meta["model"] == "resnet8" and meta["num_classes"] == 100 and meta["image_size"] == 32
    assert meta["accuracy"] == pytest.approx(info["accuracy"]) and meta["mean"] == pytest.approx([0.5071, 0.4867, 0.4408])
    io = np.load(fixtures / "resnet8_c100_s32_io.npz")
    logits = models.create("resnet8", 100).apply(variables, np.transpose(io["input_nchw"], (0, 2, 3, 1)))
    scale = max(1.0, float(np.abs(io["logits"]).max()))
    np.testing.assert_allclose(np.asarray(logits), io["logits"], atol=1e-4 * scale)


def test_evaluate_task_prints_the_stored_accuracy(imported, tmp_path, capsys):
    from kdjax.tasks import evaluate
    workdir, _ = imported
    config = load_config("evaluate", "dataset=synthetic,eval_batch_size=64")
    config.checkpoint = str(workdir)
    config.dataset_options.update(dict(num_classes=100, num_train=64, num_test=96))
    results = evaluate.run(config, str(tmp_path))
    assert "accuracy stored in the checkpoint" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["test_loss"] == pytest.approx(results["test_loss"])
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0 and np.isfinite(results["test_loss"])

    config.dataset_options.update(dict(num_classes=10, num_train=64, num_test=96))
    with pytest.raises(CheckpointError, match="num_classes=100.*num_classes=10"):
        evaluate.run(config, str(tmp_path / "wrong"))

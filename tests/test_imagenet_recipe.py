"""configs/imagenet_kd.py: the ImageNet KD recipes (mdistiller's settings per pair and distiller), and, behind
``slow``, a torchvision-format teacher imported, evaluated and distilled into MobileNetV1 from that config (small
images of the digits set: no ImageNet here)."""
import json
import sys

import numpy as np
import pytest

from conftest import FIXTURES, REPO
from kdjax import configs
from kdjax.configs import imagenet_kd
from kdjax.configs.parse import ConfigError

CONFIG = str(REPO / "configs" / "imagenet_kd.py")


def test_kd_recipe_is_mdistillers():
    c = configs.file_config(CONFIG)
    assert (c.task, c.teacher, c.student, c.dataset, c.image_size) == (
        "distill", "resnet34_imagenet", "resnet18_imagenet", "imagenet", 224)
    assert (c.epochs, c.batch_size, c.optim.lr, tuple(c.optim.decay_epochs), c.optim.decay_rate) == (
        100, 512, 0.2, (30, 60, 90), 0.1)
    assert (c.optim.weight_decay, c.optim.momentum) == (1e-4, 0.9)
    assert (c.loss.temperature, c.loss.gamma, c.loss.alpha, c.loss.beta) == (1.0, 0.5, 0.5, 0.0)


@pytest.mark.parametrize("pair, beta", [("r34_r18", 0.5), ("r50_mv1", 2.0)])
def test_dkd_recipe_per_pair(pair, beta):
    c = configs.file_config(CONFIG, f"{pair},distiller=dkd")
    assert (c.teacher, c.student) == imagenet_kd.PAIRS[pair]
    assert (c.batch_size, c.optim.lr, c.loss.temperature, c.loss.gamma, c.loss.alpha) == (512, 0.2, 1.0, 1.0, 1.0)
    assert (c.distill.dkd_alpha, c.distill.dkd_beta, c.distill.warmup) == (1.0, beta, 1)


def test_crd_recipe_and_user_fields_win():
    c = configs.file_config(CONFIG, "r50_mv1,distiller=crd,aug=cutmix,batch_size=128,epochs=2")
    assert (c.optim.lr, c.loss.gamma, c.loss.alpha, c.loss.beta, c.distill.nce_k) == (0.1, 1.0, 0.0, 0.8, 16384)
    assert (c.aug, c.batch_size, c.epochs, c.student) == ("cutmix", 128, 2, "mobilenetv1_imagenet")


def test_another_distiller_keeps_its_own_loss_defaults():
    c = configs.file_config(CONFIG, "distiller=at")
    assert (c.batch_size, c.optim.lr, c.epochs) == (512, 0.2, 100)
    assert c.loss.gamma is None and c.loss.alpha is None and c.loss.beta is None and c.loss.temperature == 4.0


def test_unknown_pair_is_one_line():
    with pytest.raises(ConfigError, match="unknown ImageNet pair 'r18_r34'; choose one of r34_r18, r50_mv1"):
        configs.file_config(CONFIG, "r18_r34")


@pytest.mark.slow  # ~1-2 min on 2 CPU cores: two ImageNet models compiled for training
def test_imported_torchvision_teacher_evaluates_and_distills_from_the_recipe(tmp_path):
    """A torchvision resnet18 .pth (random weights, 10 classes) -> import_torch -> evaluate -> KD into
    MobileNetV1 with the recipe (digits at 16 px, one epoch)."""
    sys.path.insert(0, str(FIXTURES))
    import imagenet_parity_common as common
    import test_torch_reader as craft
    from test_safetensors_import import torchvision_pth
    from helpers import load_config
    from kdjax.tasks import distill, evaluate, import_torch

    shapes = json.loads((FIXTURES / "imagenet_state_dict_shapes.json").read_text())["resnet18_c10_s64"]
    pth = craft.write(tmp_path, "resnet18-f37072fd.pth", torchvision_pth(common.state_dict(shapes)))
    config = load_config("import_torch", "model=resnet18_imagenet,num_classes=10,image_size=16,dataset=digits")
    config.source = str(pth)
    import_torch.run(config, str(tmp_path / "teacher"))

    config = load_config("evaluate", "dataset=digits,image_size=16")
    config.checkpoint = str(tmp_path / "teacher")
    results = evaluate.run(config, str(tmp_path / "eval"))
    assert 0.0 <= results["top1"] <= 1.0 and np.isfinite(results["test_loss"])

    config = configs.file_config(CONFIG, "r34_r18,teacher=resnet18_imagenet,student=mobilenetv1_imagenet,"
                                         "dataset=digits,image_size=16,epochs=1,batch_size=64,last_batch=drop")
    config.teacher_checkpoint = str(tmp_path / "teacher")
    config.optim.lr = 0.01
    results = distill.run(config, str(tmp_path / "student"))
    assert results["teacher"] == "resnet18_imagenet" and results["student"] == "mobilenetv1_imagenet"
    assert np.isfinite(results["test_loss"])

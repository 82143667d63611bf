"""ImageNet KD: ResNet34 -> ResNet18 (``r34_r18``) or ResNet50 -> MobileNetV1 (``r50_mv1``), the KD papers' recipe.

A copy to edit: ``kdjax --config=configs/imagenet_kd.py:r34_r18,distiller=dkd --config.teacher_checkpoint=DIR
--workdir=DIR`` runs it (the teacher: ``kdjax import_torch`` of torchvision's resnet34 ``.pth`` or timm's
``resnet34.tv_in1k`` safetensors). Where each number comes from: ``kdjax/configs/imagenet_kd.py``.
"""
from kdjax.configs.imagenet_kd import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

"""The model zoo: CIFAR-style ResNets, WRN, VGG, MobileNetV2, ShuffleNetV1/V2, ResNet18/50 (flax.linen, NHWC)."""
from kdjax.models.registry import check_name, create, names, register  # noqa: F401
from kdjax.models import resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenet  # noqa: F401,E402  (they register)

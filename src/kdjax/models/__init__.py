"""The model zoo: CIFAR-style ResNets, WRN, VGG, MobileNetV2, ShuffleNetV1/V2, ResNet18/50 (flax.linen, NHWC), and
the ImageNet models resnet18/34/50_imagenet (torchvision's) and mobilenetv1_imagenet.

``apply(variables, x, train=False, features=False, preact=False)``: logits, or ``(features, logits)`` as the
original's ``forward(x, is_feat=True, preact=...)``; ``feature_mask(name, params_or_batch_stats)``: which leaves
belong to the original's ``get_feat_modules()``.
"""
from kdjax.models.registry import (abstract_feature_shapes, check_name, create, feature_mask,  # noqa: F401
                                   feature_shapes, names, non_feature_modules, register)
from kdjax.models import resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenet  # noqa: F401,E402  (they register)
from kdjax.models import resnet_imagenet, mobilenetv1  # noqa: F401,E402  (ImageNet zoo)

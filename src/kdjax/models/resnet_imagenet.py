"""torchvision's ImageNet ResNets: ``resnet18_imagenet``, ``resnet34_imagenet``, ``resnet50_imagenet``.

The architecture of ``torchvision.models.resnet{18,34,50}`` (and of the original's ``models/resnet_imagenet.py``, a
copy of it): conv7x7 stride 2 + BN + ReLU stem, max-pool 3x3 stride 2 (padding 1), four stages of BasicBlocks
(18/34) or Bottlenecks (50, torchvision's "v1.5": the stride sits on the 3x3 conv), widths 64/128/256/512 (x4 for
Bottleneck) with strides 1/2/2/2, a conv1x1 + BN ``downsample`` wherever a block changes shape, global average
pool, ``fc`` with bias. Submodule names follow torchvision's state_dict (``layer2.0.downsample.1`` ->
``layer2_0/downsample_1``), so torchvision's ``.pth`` files and timm's ``*.tv_in1k`` safetensors copies import as
they are. Parameter counts at 1000 classes: 11,689,512 / 21,797,672 / 25,557,032, as torchvision's.

Why the ``_imagenet`` suffix: the zoo already has the CIFAR-stem ``ResNet18``/``ResNet50`` (3x3 stride-1 stem, no
max-pool); registry names are case-sensitive, and ``resnet18`` beside ``ResNet18`` would pick a different network
by one letter's case -- both run on any image size, so the slip would go unnoticed.

``features=True`` gives, as the original's ``forward(x, is_feat=True)``: the stem after its ReLU (before the
max-pool), the output of layers 1-4, and the pooled vector. ``preact=True`` replaces the layer outputs with the
last block's residual sum before its final ReLU (mdistiller's ImageNet ResNet ``preact_feats``; the original raises
NotImplementedError there); the stem and pooled features are unchanged.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers, resnetv2
from kdjax.models.layers import conv, global_avg_pool, torch_linear
from kdjax.models.registry import register


class BasicBlock(resnetv2.BasicBlock):
    """The CIFAR zoo's BasicBlock (``kdjax.models.resnetv2``) under torchvision's names: the projection is
    ``downsample``."""
    shortcut: str = "downsample"


class Bottleneck(resnetv2.Bottleneck):
    """The CIFAR zoo's Bottleneck (the stride on the 3x3 conv, torchvision's "v1.5") under torchvision's names."""
    shortcut: str = "downsample"


def torch_max_pool_3x3_s2(x):
    """``nn.MaxPool2d(3, stride=2, padding=1)``: the padding never wins (flax pads a max-pool with -inf)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ImageNetResNet(nn.Module):
    """``block`` is BasicBlock or Bottleneck; ``num_blocks`` the block count of each of the four stages."""

    # Top-level modules outside the feature modules (see models.feature_mask).
    non_feature_modules = ("fc",)

    block: Any
    num_blocks: Sequence[int]
    num_classes: int
    image_size: int = 224
    dtype: Any = jnp.float32
    bn_groups: int = 1  # >1: the batch is that many parts, each with its own statistics (layers.BatchNorm)

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        x = x.astype(self.dtype)
        x = conv(64, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn1")(x, train))
        feats = [x]
        x = torch_max_pool_3x3_s2(x)
        x, stage_feats = resnetv2.four_stages(self.block, self.num_blocks, self.dtype, self.bn_groups, x, train, preact)
        feats += stage_feats
        pooled = global_avg_pool(x, self.dtype)
        feats.append(pooled)
        logits = torch_linear(self.num_classes, 512 * self.block.expansion, self.dtype, "fc")(pooled)
        logits = logits.astype(jnp.float32)
        return (feats, logits) if features else logits


def _builder(block, num_blocks: Sequence[int]):
    def build(num_classes: int, image_size: int = 224, dtype=jnp.float32):
        return ImageNetResNet(block=block, num_blocks=tuple(num_blocks), num_classes=num_classes,
                              image_size=image_size, dtype=dtype)
    return build


# registry name -> torchvision's name, for the import's messages and the docs
TORCHVISION_NAMES = {"resnet18_imagenet": "resnet18", "resnet34_imagenet": "resnet34",
                     "resnet50_imagenet": "resnet50"}
register("resnet18_imagenet", _builder(BasicBlock, (2, 2, 2, 2)))
register("resnet34_imagenet", _builder(BasicBlock, (3, 4, 6, 3)))
register("resnet50_imagenet", _builder(Bottleneck, (3, 4, 6, 3)))

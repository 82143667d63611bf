"""ResNet18 / ResNet50 in their CIFAR form: 3x3 stride-1 stem conv + BN + ReLU, no max-pool, four stages of widths
64/128/256/512 (x4 for Bottleneck) with strides 1/2/2/2, 1x1 conv + BN projection shortcuts, global average pool,
``linear`` classifier. Submodule names follow the PyTorch state_dict
(``layer2.0.shortcut.1`` -> ``layer2_0/shortcut_1``).

``preact=True`` (with ``features=True``) returns, for layers 1-4, the last block's residual sum before its final
ReLU, as the original's ``forward(x, is_feat=True, preact=True)``; the stem and pooled features are unchanged.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.registry import register
from kdjax.models.layers import conv, global_avg_pool, torch_linear


def _shortcut(x, out_planes: int, stride: int, dtype, bn_groups: int, train: bool, name: str = "shortcut"):
    """Identity, or conv1x1(stride) + BN when the block changes shape (named as the PyTorch nn.Sequential:
    ``shortcut`` in the original's CIFAR ResNets, ``downsample`` in torchvision's)."""
    if stride == 1 and x.shape[-1] == out_planes:
        return x
    y = conv(out_planes, 1, stride, dtype, f"{name}_0")(x)
    return layers.BatchNorm(groups=bn_groups, dtype=dtype, name=f"{name}_1")(y, train)


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU. Output width = planes.
    With ``preact=True`` it returns ``(output, sum before the ReLU)``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1
    shortcut: str = "shortcut"  # the projection's name ("downsample" in torchvision's ResNets)
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        bn = lambda name: layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)  # noqa: E731
        out = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, self.dtype, "conv1")(x), train))
        out = bn("bn2")(conv(self.planes, 3, 1, self.dtype, "conv2")(out), train)
        out = out + _shortcut(x, self.planes, self.stride, self.dtype, self.bn_groups, train, self.shortcut)
        return (nn.relu(out), out) if preact else nn.relu(out)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(4 planes)-BN + shortcut, ReLU. Output width = 4 planes.
    With ``preact=True`` it returns ``(output, sum before the ReLU)``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1
    shortcut: str = "shortcut"  # the projection's name ("downsample" in torchvision's ResNets)
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        bn = lambda name: layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)  # noqa: E731
        out_planes = self.expansion * self.planes
        out = nn.relu(bn("bn1")(conv(self.planes, 1, 1, self.dtype, "conv1")(x), train))
        out = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, self.dtype, "conv2")(out), train))
        out = bn("bn3")(conv(out_planes, 1, 1, self.dtype, "conv3")(out), train)
        out = out + _shortcut(x, out_planes, self.stride, self.dtype, self.bn_groups, train, self.shortcut)
        return (nn.relu(out), out) if preact else nn.relu(out)


def four_stages(block, num_blocks: Sequence[int], dtype, bn_groups: int, x, train: bool, preact: bool):
    """The four stages of both ResNet families (the CIFAR ResNet18/50 here, torchvision's ImageNet ResNets): widths
    64/128/256/512, strides 1/2/2/2, ``num_blocks`` blocks each, named ``layer<stage>_<i>`` (the state_dict's
    ``layer<stage>.<i>``). Called inside a module's compact ``__call__``. Returns the output and, per stage, its
    output, or with ``preact`` its last block's sum before the ReLU (the original's is_last block)."""
    feats = []
    for stage, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
        n = num_blocks[stage - 1]
        for i in range(n - 1):
            x = block(planes, stride if i == 0 else 1, dtype, bn_groups, name=f"layer{stage}_{i}")(x, train)
        x, pre = block(planes, stride if n == 1 else 1, dtype, bn_groups, name=f"layer{stage}_{n - 1}")(
            x, train, preact=True)
        feats.append(pre if preact else x)
    return x, feats


class ResNetV2(nn.Module):
    """``block`` is BasicBlock or Bottleneck; ``num_blocks`` the block count of each of the four stages."""

    # Top-level modules outside the original's get_feat_modules() (see models.feature_mask).
    non_feature_modules = ("linear",)

    block: Any
    num_blocks: Sequence[int]
    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        x = x.astype(self.dtype)
        x = conv(64, 3, 1, self.dtype, "conv1")(x)
        x = nn.relu(layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn1")(x, train))
        feats = [x]
        x, stage_feats = four_stages(self.block, self.num_blocks, self.dtype, self.bn_groups, x, train, preact)
        feats += stage_feats
        pooled = global_avg_pool(x, self.dtype)
        feats.append(pooled)
        logits = torch_linear(self.num_classes, 512 * self.block.expansion, self.dtype, "linear")(pooled)
        logits = logits.astype(jnp.float32)
        return (feats, logits) if features else logits


def _builder(block, num_blocks: Sequence[int]):
    def build(num_classes: int, image_size: int = 32, dtype=jnp.float32):
        return ResNetV2(block=block, num_blocks=tuple(num_blocks), num_classes=num_classes, image_size=image_size,
                        dtype=dtype)
    return build


register("ResNet18", _builder(BasicBlock, (2, 2, 2, 2)))
register("ResNet50", _builder(Bottleneck, (3, 4, 6, 3)))

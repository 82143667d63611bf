"""CIFAR ResNets: resnet8/14/20/32/44/56/110 (widths 16/32/64) and resnet8x4/resnet32x4 (stem 32, widths 64/128/256).

conv3x3 -> BN -> ReLU stem without max-pool; three stages of ``(depth - 2) // 6`` BasicBlocks with strides 1/2/2; a
1x1 conv + BN projection shortcut wherever the block changes shape; global average pool; fc with bias.
Submodule names follow the PyTorch state_dict (``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``).

``preact=True`` (with ``features=True``) returns, for layers 1-3, the last block's residual sum before its final
ReLU, as the original's ``forward(x, is_feat=True, preact=True)``; the stem and pooled features are unchanged.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.layers import conv, global_avg_pool, torch_linear
from kdjax.models.registry import register


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the identity or a 1x1 conv + BN projection, then ReLU.
    With ``preact=True`` it returns ``(output, sum before the ReLU)``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        bn = lambda name: layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)  # noqa: E731
        out = conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        out = nn.relu(bn("bn1")(out, train))
        out = conv(self.planes, 3, 1, self.dtype, "conv2")(out)
        out = bn("bn2")(out, train)
        if self.stride != 1 or x.shape[-1] != self.planes:
            residual = conv(self.planes, 1, self.stride, self.dtype, "downsample_0")(x)
            residual = bn("downsample_1")(residual, train)
        else:
            residual = x
        out = out + residual
        return (nn.relu(out), out) if preact else nn.relu(out)


class CifarResNet(nn.Module):
    """``widths`` = (stem, stage1, stage2, stage3); ``depth`` = 6n + 2 with n BasicBlocks per stage."""

    # Top-level modules outside the original's get_feat_modules() (see models.feature_mask).
    non_feature_modules = ("fc",)

    depth: int
    widths: Sequence[int]
    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (8, 14, 20, ...), got {self.depth}")
        n = (self.depth - 2) // 6
        x = x.astype(self.dtype)
        x = conv(self.widths[0], 3, 1, self.dtype, "conv1")(x)
        x = layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn1")(x, train)
        x = nn.relu(x)
        feats = [x]
        for stage, (planes, stride) in enumerate(zip(self.widths[1:], (1, 2, 2)), start=1):
            for i in range(n - 1):
                x = BasicBlock(planes, stride if i == 0 else 1, self.dtype, self.bn_groups,
                               name=f"layer{stage}_{i}")(x, train)
            # the last block also gives its pre-ReLU sum (the original's is_last block)
            x, pre = BasicBlock(planes, stride if n == 1 else 1, self.dtype, self.bn_groups,
                                name=f"layer{stage}_{n - 1}")(x, train, preact=True)
            feats.append(pre if preact else x)
        pooled = global_avg_pool(x, self.dtype)
        feats.append(pooled)
        logits = torch_linear(self.num_classes, self.widths[-1], self.dtype, "fc")(pooled)
        logits = logits.astype(jnp.float32)
        return (feats, logits) if features else logits


def _builder(depth: int, widths: Sequence[int]):
    def build(num_classes: int, image_size: int = 32, dtype=jnp.float32):
        return CifarResNet(depth=depth, widths=tuple(widths), num_classes=num_classes, image_size=image_size,
                           dtype=dtype)
    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_depth}", _builder(_depth, (16, 16, 32, 64)))
register("resnet8x4", _builder(8, (32, 64, 128, 256)))
register("resnet32x4", _builder(32, (32, 64, 128, 256)))

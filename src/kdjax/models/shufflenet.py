"""ShuffleNet V1 (groups 3) and V2 (net size 1) in the CIFAR form of the original: a 1x1 stride-1 stem conv 3->24
with BN-ReLU and no stem pooling, three stages, a global average pool and a Linear. PyTorch default initialisation
throughout (conv kernels and the Linear U(+-1/sqrt(fan_in)), Linear bias likewise, BN gamma 1 / beta 0).

Channel shuffle reproduces PyTorch's NCHW ``view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)`` on NHWC arrays: output
channel ``j * g + i`` is input channel ``i * (C / g) + j``.

Flax names: stem ``conv1``/``bn1``, block j of stage s ``layer{s}_{j}`` with ``conv1..convK``/``bn1..bnK`` inside,
V2 head ``conv2``/``bn2``, classifier ``linear``.

``preact=True`` (with ``features=True``) returns, for stages 1-3, the last block's output before its final ReLU,
as the original: V1 the residual sum; V2 the concat [x1, branch before its last ReLU], taken *before* the channel
shuffle (the original returns it unshuffled).

ShuffleV1 pools globally. The original applies ``avg_pool2d(out, 4)``, which is the same on 32x32 inputs (final
map 4x4) and breaks its Linear on 64x64 inputs (final map 8x8); global pooling is the natural extension there.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.registry import register

STEM_CHANNELS = 24


def channel_shuffle(x, groups: int):
    """PyTorch ShuffleBlock semantics on an NHWC array (channels on the last axis)."""
    n, h, w, c = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels are not divisible into {groups} groups")
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def _conv(features, kernel, name, dtype, stride=1, groups=1):
    return layers.conv(features, kernel, stride, dtype, name, kernel_init=layers.torch_default_kernel, groups=groups)


def _stem(module, x, train):
    """conv1 (1x1, 3->24) + bn1 + ReLU, created inside ``module``'s compact call (names at its top level)."""
    x = _conv(STEM_CHANNELS, 1, "conv1", module.dtype)(x)
    return nn.relu(layers.BatchNorm(groups=module.bn_groups, dtype=module.dtype, name="bn1")(x, train))


# ---------------------------------------------------------------------------------------------------------------
# ShuffleNet V1
# ---------------------------------------------------------------------------------------------------------------


class BottleneckV1(nn.Module):
    """Grouped 1x1 - BN - ReLU - shuffle - dw3x3(stride) - BN - ReLU - grouped 1x1 - BN, then + identity (stride 1) or
    concat [branch, avgpool3x3/2(x)] (stride 2; the pool counts zero padding, as PyTorch's default), then ReLU.
    With ``preact=True`` it returns ``(output, sum or concat before the ReLU)``."""

    out_channels: int  # of the branch; the stride-2 block's output is this plus the input width
    stride: int
    groups: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        in_channels = x.shape[-1]
        mid = self.out_channels // 4
        # The first block after the 24-channel stem uses an ungrouped first conv (24 is too narrow to split).
        first_groups = 1 if in_channels == STEM_CHANNELS else self.groups

        def bn(name):
            return layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)

        y = nn.relu(bn("bn1")(_conv(mid, 1, "conv1", self.dtype, groups=first_groups)(x), train))
        y = channel_shuffle(y, first_groups)
        y = nn.relu(bn("bn2")(_conv(mid, 3, "conv2", self.dtype, stride=self.stride, groups=mid)(y), train))
        y = bn("bn3")(_conv(self.out_channels, 1, "conv3", self.dtype, groups=self.groups)(y), train)
        if self.stride == 2:
            shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
            pre = jnp.concatenate([y, shortcut.astype(y.dtype)], axis=-1)
        else:
            pre = y + x
        return (nn.relu(pre), pre) if preact else nn.relu(pre)


class ShuffleNetV1(nn.Module):
    """``__call__(x, train, features, preact)``: logits, or ``(features, logits)`` with features = [stem, stage1,
    stage2, stage3, pooled vector]; ``preact`` gives the stages before their last ReLU."""

    # Top-level modules outside the original's get_feat_modules() (see models.feature_mask).
    non_feature_modules = ("linear",)

    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1
    out_channels: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        x = _stem(self, x.astype(self.dtype), train)
        feats = [x]
        for s, (width, blocks) in enumerate(zip(self.out_channels, self.num_blocks)):
            for j in range(blocks):
                # The stride-2 first block concatenates its input, so its branch makes only the missing channels.
                branch = width - x.shape[-1] if j == 0 else width
                x, pre = BottleneckV1(branch, 2 if j == 0 else 1, self.groups, dtype=self.dtype,
                                      bn_groups=self.bn_groups, name=f"layer{s + 1}_{j}")(x, train, preact=True)
            feats.append(pre if preact else x)  # pre of the stage's last block (the original's is_last)
        x = layers.global_avg_pool(x, self.dtype)
        feats.append(x)
        logits = layers.torch_linear(self.num_classes, x.shape[-1], self.dtype, "linear")(x).astype(jnp.float32)
        return (feats, logits) if features else logits


# ---------------------------------------------------------------------------------------------------------------
# ShuffleNet V2
# ---------------------------------------------------------------------------------------------------------------


class BasicBlockV2(nn.Module):
    """Split channels in halves [x1 | x2]; x2 -> 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU; concat [x1, branch]; shuffle 2.
    With ``preact=True`` it returns ``(output, concat [x1, branch before its last ReLU])``, the latter unshuffled."""

    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        split = int(x.shape[-1] * 0.5)
        x1, x2 = x[..., :split], x[..., split:]
        c = x2.shape[-1]

        def bn(name):
            return layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)

        y = nn.relu(bn("bn1")(_conv(c, 1, "conv1", self.dtype)(x2), train))
        y = bn("bn2")(_conv(c, 3, "conv2", self.dtype, groups=c)(y), train)
        y = bn("bn3")(_conv(c, 1, "conv3", self.dtype)(y), train)
        out = channel_shuffle(jnp.concatenate([x1, nn.relu(y)], axis=-1), 2)
        return (out, jnp.concatenate([x1, y], axis=-1)) if preact else out


class DownBlockV2(nn.Module):
    """Two stride-2 branches on the same input, concatenated [left, right] and shuffled with 2 groups:
    left = dw3x3/2-BN, 1x1-BN-ReLU; right = 1x1-BN-ReLU, dw3x3/2-BN, 1x1-BN-ReLU."""

    out_channels: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        in_channels = x.shape[-1]
        mid = self.out_channels // 2

        def bn(name):
            return layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)

        left = bn("bn1")(_conv(in_channels, 3, "conv1", self.dtype, stride=2, groups=in_channels)(x), train)
        left = nn.relu(bn("bn2")(_conv(mid, 1, "conv2", self.dtype)(left), train))
        right = nn.relu(bn("bn3")(_conv(mid, 1, "conv3", self.dtype)(x), train))
        right = bn("bn4")(_conv(mid, 3, "conv4", self.dtype, stride=2, groups=mid)(right), train)
        right = nn.relu(bn("bn5")(_conv(mid, 1, "conv5", self.dtype)(right), train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """``__call__(x, train, features, preact)``: logits, or ``(features, logits)`` with features = [stem, stage1,
    stage2, stage3, pooled vector]; ``preact`` gives the stages' last concat before the ReLU and the shuffle."""

    # Top-level modules outside the original's get_feat_modules() (conv1, bn1, layer1-3): the head and linear.
    non_feature_modules = ("conv2", "bn2", "linear")

    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1
    out_channels: Sequence[int] = (116, 232, 464, 1024)  # three stages, then the 1x1 head conv
    num_blocks: Sequence[int] = (3, 7, 3)  # BasicBlocks after each stage's DownBlock

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        x = _stem(self, x.astype(self.dtype), train)
        feats = [x]
        for s, (width, blocks) in enumerate(zip(self.out_channels[:3], self.num_blocks)):
            x = DownBlockV2(width, dtype=self.dtype, bn_groups=self.bn_groups, name=f"layer{s + 1}_0")(x, train)
            for j in range(1, blocks + 1):  # the last one is the original's is_last block
                x, pre = BasicBlockV2(dtype=self.dtype, bn_groups=self.bn_groups, name=f"layer{s + 1}_{j}")(
                    x, train, preact=True)
            feats.append(pre if preact else x)
        x = _conv(self.out_channels[3], 1, "conv2", self.dtype)(x)
        x = nn.relu(layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn2")(x, train))
        x = layers.global_avg_pool(x, self.dtype)
        feats.append(x)
        logits = layers.torch_linear(self.num_classes, x.shape[-1], self.dtype, "linear")(x).astype(jnp.float32)
        return (feats, logits) if features else logits


@register("ShuffleV1")
def shufflev1(num_classes, image_size=32, dtype=jnp.float32):
    return ShuffleNetV1(num_classes=num_classes, image_size=image_size, dtype=dtype)


@register("ShuffleV2")
def shufflev2(num_classes, image_size=32, dtype=jnp.float32):
    return ShuffleNetV2(num_classes=num_classes, image_size=image_size, dtype=dtype)

"""MobileNetV2 as used for CIFAR distillation (the RCO variant at half width, the original's ``mobile_half``).

Differences from the ImageNet MobileNetV2 that matter for parity: the 3x3 stem has stride 2 (32x32 -> 16x16); every
inverted residual has the 1x1 expansion conv, even with expansion 1; the last 1x1 conv keeps 1280 channels at width
0.5; pooling is global (the original's AvgPool2d(image_size // 16) always covers the whole final map); the classifier
is ``Sequential(Linear)``, hence flax ``classifier_0``.

Flax names: stem ``conv1_0``/``conv1_1``, block j of stage i ``blocks_i_j`` with ``conv_0, conv_1`` (pw + BN),
``conv_3, conv_4`` (dw + BN), ``conv_6, conv_7`` (pw-linear + BN), head ``conv2_0``/``conv2_1``.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.registry import register

def stage_settings(expansion: int):
    """(expansion, channels at width 1, repeats, stride of the first repeat) of the seven stages."""
    t = expansion
    return ((1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2), (t, 320, 1, 1))


# Stages after which a feature map is reported: f1..f4 (f0 is the stem output, f5 the pooled vector).
FEATURE_STAGES = (1, 2, 4, 6)


def check_image_size(image_size: int) -> None:
    # The original asserts it (its pooling kernel is image_size // 16 and must cover the final map).
    if image_size % 32:
        raise ValueError(f"MobileNetV2 needs image_size divisible by 32 (got {image_size}); use 32 or 64")


def _conv(features, kernel, stride, name, dtype, groups=1):
    return layers.conv(features, kernel, stride, dtype, name, groups=groups)


class InvertedResidual(nn.Module):
    """pw-BN-ReLU, dw3x3(stride)-BN-ReLU, pw-BN; identity residual iff stride 1 and same width."""

    out_channels: int
    stride: int
    expansion: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        in_channels = x.shape[-1]
        hidden = in_channels * self.expansion

        def bn(name):
            return layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)

        y = nn.relu(bn("conv_1")(_conv(hidden, 1, 1, "conv_0", self.dtype)(x), train))
        y = nn.relu(bn("conv_4")(_conv(hidden, 3, self.stride, "conv_3", self.dtype, groups=hidden)(y), train))
        y = bn("conv_7")(_conv(self.out_channels, 1, 1, "conv_6", self.dtype)(y), train)
        if self.stride == 1 and in_channels == self.out_channels:
            return x + y
        return y


class MobileNetV2(nn.Module):
    """``__call__(x, train, features, preact)``: logits [B, C] float32, or ``(features, logits)`` with features =
    [stem, after stage 1, stage 2, stage 4, stage 6, pooled 1280-vector]. ``preact`` is accepted and ignored, as
    in the original (the stage outputs end in a BN without ReLU already)."""

    # Top-level modules outside the original's get_feat_modules() (conv1 and blocks): the 1x1 head conv + BN and
    # the classifier.
    non_feature_modules = ("conv2_0", "conv2_1", "classifier_0")

    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1
    expansion: int = 6
    width: float = 0.5

    def _bn(self, name):
        return layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        del preact  # the original's forward ignores it
        check_image_size(self.image_size)
        x = x.astype(self.dtype)
        x = _conv(int(32 * self.width), 3, 2, "conv1_0", self.dtype)(x)
        x = nn.relu(self._bn("conv1_1")(x, train))
        feats = [x]
        for i, (t, c, n, s) in enumerate(stage_settings(self.expansion)):
            for j in range(n):
                x = InvertedResidual(int(c * self.width), s if j == 0 else 1, t, dtype=self.dtype,
                                     bn_groups=self.bn_groups, name=f"blocks_{i}_{j}")(x, train)
            if i in FEATURE_STAGES:
                feats.append(x)
        last_channels = int(1280 * self.width) if self.width > 1.0 else 1280
        x = _conv(last_channels, 1, 1, "conv2_0", self.dtype)(x)
        x = nn.relu(self._bn("conv2_1")(x, train))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        feats.append(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.normal_001,
                          bias_init=nn.initializers.zeros, name="classifier_0")(x)
        logits = logits.astype(jnp.float32)
        return (feats, logits) if features else logits


@register("MobileNetV2")
def mobilenetv2_half(num_classes, image_size=32, dtype=jnp.float32):
    check_image_size(image_size)
    return MobileNetV2(num_classes=num_classes, image_size=image_size, dtype=dtype)

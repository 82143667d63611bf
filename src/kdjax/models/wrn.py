"""Wide ResNets (pre-activation): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, wrn_28_10.

conv3x3(3 -> 16) without BN after it; three stages of ``(depth - 4) // 6`` blocks of widths 16k/32k/64k with strides
1/2/2; block = BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the identity, or, when the width changes, a 1x1 conv
shortcut fed by the block's BN-ReLU'd input; final BN-ReLU, global average pool, fc. Dropout is 0 in every
registered variant and therefore absent. Submodule names follow the PyTorch state_dict
(``block2.layer.0.convShortcut`` -> ``block2/layer_0/convShortcut``).

``preact=True`` (with ``features=True``) replaces f1, f2, f3 by the *next* BatchNorm applied to them, as the
original does (``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)``, ``bn1(f3)``). Those are the very BN outputs
the forward computes anyway, so they are reused; but the original calls each of these three BNs a second time, so
in train mode their running statistics take the batch's update twice, and so they do here.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.registry import register
from kdjax.models.layers import conv, global_avg_pool


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 + identity or 1x1 conv shortcut. Returns ``(output, bn1(x))``;
    ``preact=True`` updates bn1's running statistics twice in train mode (the original's repeated call)."""

    out_planes: int
    stride: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        bn = lambda name: layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name)  # noqa: E731
        # The original decides on channel counts alone (its "equalInOut"); a width change is always present where
        # the stride is 2, so the identity path never needs to stride.
        equal_in_out = x.shape[-1] == self.out_planes
        entry = bn("bn1")(x, train, updates=2 if preact else 1)
        act = nn.relu(entry)
        out = conv(self.out_planes, 3, self.stride, self.dtype, "conv1")(act)
        out = nn.relu(bn("bn2")(out, train))
        out = conv(self.out_planes, 3, 1, self.dtype, "conv2")(out)
        if equal_in_out:
            return x + out, entry
        return conv(self.out_planes, 1, self.stride, self.dtype, "convShortcut")(act) + out, entry


class NetworkBlock(nn.Module):
    """One stage; its blocks live under ``layer_<i>`` as in the original's ``self.layer = nn.Sequential(...)``.
    Returns ``(output, first block's bn1(input))``; ``preact`` is passed to the first block."""

    num_layers: int
    out_planes: int
    stride: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool, preact: bool = False):
        x, entry = WideBasic(self.out_planes, self.stride, self.dtype, self.bn_groups, name="layer_0")(x, train, preact)
        for i in range(1, self.num_layers):
            x, _ = WideBasic(self.out_planes, 1, self.dtype, self.bn_groups, name=f"layer_{i}")(x, train)
        return x, entry


class WideResNet(nn.Module):
    # Top-level modules outside the original's get_feat_modules(): the final BN (it follows f3) and fc.
    non_feature_modules = ("bn1", "fc")

    depth: int
    widen_factor: int
    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {self.depth}")
        n = (self.depth - 4) // 6
        k = self.widen_factor
        preact = preact and features  # as the original: without is_feat no BN is called twice
        x = x.astype(self.dtype)
        x = conv(16, 3, 1, self.dtype, "conv1")(x)
        feats, entries = [x], []
        for stage, (planes, stride) in enumerate(zip((16 * k, 32 * k, 64 * k), (1, 2, 2)), start=1):
            # preact re-applies the entry BN of blocks 2 and 3 (to f1, f2), not that of block 1
            x, entry = NetworkBlock(n, planes, stride, self.dtype, self.bn_groups, name=f"block{stage}")(
                x, train, preact and stage > 1)
            feats.append(x)  # block3's entry is taken before the final BN-ReLU, as the original's f3
            entries.append(entry)
        last = layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn1")(x, train,
                                                                                      updates=2 if preact else 1)
        x = nn.relu(last)
        pooled = global_avg_pool(x, self.dtype)
        feats.append(pooled)
        if preact:  # f1, f2, f3 through the BN that follows each (see the module docstring)
            feats[1:4] = [entries[1], entries[2], last]
        # The original zeroes the fc bias and keeps PyTorch's default weight init.
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.torch_default_kernel,
                          bias_init=nn.initializers.zeros, name="fc")(pooled)
        logits = logits.astype(jnp.float32)
        return (feats, logits) if features else logits


def _builder(depth: int, widen_factor: int):
    def build(num_classes: int, image_size: int = 32, dtype=jnp.float32):
        return WideResNet(depth=depth, widen_factor=widen_factor, num_classes=num_classes, image_size=image_size,
                          dtype=dtype)
    return build


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 10)):
    register(f"wrn_{_depth}_{_k}", _builder(_depth, _k))

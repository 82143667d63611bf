"""VGG with BatchNorm for 32x32 / 64x64 inputs (the original's ``vgg*_bn``; registered as vgg8/11/13/16/19).

Five blocks of conv3x3 (with bias) + BN + ReLU. A 2x2 max-pool follows blocks 0-2; block 3 is followed by one only
when the input is 64 pixels high (decided on the runtime shape, so a 32x32-built teacher also runs on 64x64);
block 4 is followed by a global average pool and a single Linear(512 -> C).

Flax names follow the PyTorch ``nn.Sequential`` indices of each block: layer j of block b is conv ``block{b}_{3j}``
and BN ``block{b}_{3j+1}`` (index 3j+2 is the parameter-free ReLU).
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.registry import register

# Output widths of the convs of each of the five blocks.
CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

# Index of the block after which the extra max-pool is inserted for 64x64 inputs, and that input height.
_EXTRA_POOL_BLOCK = 3
_EXTRA_POOL_HEIGHT = 64


def _max_pool2(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    """``__call__(x, train, features, preact)``: logits [B, C] float32, or ``(features, logits)`` with
    features = [relu(block0), relu(block1), ..., relu(block4), pooled 512-vector] (each before its max-pool);
    ``preact=True`` gives blocks 1-4 before their ReLU (block 0 stays after it, as in the original)."""

    # Top-level modules outside the original's get_feat_modules() (see models.feature_mask).
    non_feature_modules = ("classifier",)

    cfg: Sequence[Sequence[int]]
    num_classes: int
    image_size: int = 32
    dtype: Any = jnp.float32
    bn_groups: int = 1

    def _block(self, index: int, widths: Sequence[int], x, train: bool):
        """Conv-BN(-ReLU) layers of one block; the last ReLU is left to the caller (it is outside the block)."""
        for j, width in enumerate(widths):
            if j > 0:
                x = nn.relu(x)
            x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), use_bias=True, dtype=self.dtype,
                        kernel_init=layers.kaiming_normal_fan_out, bias_init=nn.initializers.zeros,
                        name=f"block{index}_{3 * j}")(x)
            x = layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=f"block{index}_{3 * j + 1}")(x, train)
        return x

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        height = x.shape[1]
        x = x.astype(self.dtype)
        feats = []
        last = len(self.cfg) - 1
        for index, widths in enumerate(self.cfg):
            pre = self._block(index, widths, x, train)
            x = nn.relu(pre)
            feats.append(pre if preact and index > 0 else x)
            if index < _EXTRA_POOL_BLOCK or (index == _EXTRA_POOL_BLOCK and height == _EXTRA_POOL_HEIGHT):
                x = _max_pool2(x)
            elif index == last:
                x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        feats.append(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.normal_001,
                          bias_init=nn.initializers.zeros, name="classifier")(x)
        logits = logits.astype(jnp.float32)
        return (feats, logits) if features else logits


def _constructor(cfg, num_classes, image_size=32, dtype=jnp.float32):
    return VGG(cfg=cfg, num_classes=num_classes, image_size=image_size, dtype=dtype)


for _name, _cfg in CONFIGS.items():
    register(_name, functools.partial(_constructor, _cfg))

"""``mobilenetv1_imagenet``: the ImageNet MobileNetV1 of the KD literature (mdistiller's
``models/imagenet/mobilenetv1.py``, the student of the ResNet50 -> MobileNetV1 pair of CRD, DKD and their successors).

conv3x3 stride 2 (3 -> 32) + BN + ReLU, then 13 depthwise-separable blocks (depthwise conv3x3 + BN + ReLU, pointwise
conv1x1 + BN + ReLU) of widths 64, 128, 128, 256, 256, 512 x6, 1024, 1024 with stride 2 at blocks 2, 4, 6 and 12,
average pool, ``fc`` (1024 -> classes) with bias. PyTorch's default initialisation everywhere (the reference sets
none). 4,231,976 parameters at 1000 classes. Names follow the reference's state_dict: its ``model`` Sequential
(``model.3.4.weight``, block 3's pointwise BN, -> ``params/model_3_4/scale``) and ``fc``.

The reference pools with ``AvgPool2d(7)``, which is the global average at its 224 px; here the pool is global at
every size (the reference cannot run below 224 px, so nothing else is comparable).

``features=True`` gives the stem's output (after its ReLU, 32 channels at stride 2), the ReLU outputs of blocks 3,
5, 11 and 13 (widths 128, 256, 512, 1024 at strides 4, 8, 16, 32) and the pooled vector: the reference's ``feats``
+ ``pooled_feat`` with the stem in front, so that the list matches the ImageNet ResNets' entry by entry in length
and spatial size (stem, four stages, pooled) for the feature distillers of the ResNet50 -> MobileNetV1 pair.
``preact=True`` gives those blocks' last BN output before the ReLU (the reference's ``preact_feats``); the stem and
pooled entries are unchanged, as in the rest of the zoo.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models import layers
from kdjax.models.layers import conv, global_avg_pool, torch_default_kernel, torch_linear
from kdjax.models.registry import register

# (output width, stride) of the 13 depthwise-separable blocks, model.1 ... model.13
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))
# the blocks (indices into the reference's ``model`` Sequential) whose outputs are the features
FEATURE_BLOCKS = (3, 5, 11, 13)


class MobileNetV1(nn.Module):
    # Top-level modules outside the feature modules (see models.feature_mask).
    non_feature_modules = ("fc",)

    num_classes: int
    image_size: int = 224
    dtype: Any = jnp.float32
    bn_groups: int = 1  # >1: the batch is that many parts, each with its own statistics (layers.BatchNorm)

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        def conv_bn(y, width, kernel, stride, name_conv, name_bn, groups=1):
            y = conv(width, kernel, stride, self.dtype, name_conv, kernel_init=torch_default_kernel, groups=groups)(y)
            return layers.BatchNorm(groups=self.bn_groups, dtype=self.dtype, name=name_bn)(y, train)

        x = x.astype(self.dtype)
        # the flax names glue the Sequential indices: model.0.1 (a BN) -> model_0_1 (see layers' naming rule)
        x = nn.relu(conv_bn(x, 32, 3, 2, "model_0_0", "model_0_1"))
        feats = [x]
        for i, (width, stride) in enumerate(BLOCKS, start=1):
            x = nn.relu(conv_bn(x, x.shape[-1], 3, stride, f"model_{i}_0", f"model_{i}_1", groups=x.shape[-1]))
            pre = conv_bn(x, width, 1, 1, f"model_{i}_3", f"model_{i}_4")
            x = nn.relu(pre)
            if i in FEATURE_BLOCKS:
                feats.append(pre if preact else x)
        pooled = global_avg_pool(x, self.dtype)
        feats.append(pooled)
        logits = torch_linear(self.num_classes, 1024, self.dtype, "fc")(pooled).astype(jnp.float32)
        return (feats, logits) if features else logits


@register("mobilenetv1_imagenet")
def build(num_classes: int, image_size: int = 224, dtype=jnp.float32):
    return MobileNetV1(num_classes=num_classes, image_size=image_size, dtype=dtype)

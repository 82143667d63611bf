"""A tiny user-registered model for fast training tests (also importable as a launch.py plugin:
``KDJAX_PLUGINS=tiny_models`` with this folder on PYTHONPATH)."""
import flax.linen as nn
import jax.numpy as jnp

from kdjax import models
from kdjax.models.layers import BatchNorm


class TinyCNN(nn.Module):
    """conv-BN-ReLU, conv(stride 2)-BN-ReLU, global mean, fc. Features: [last map, pooled vector]; with
    ``preact=True`` the map is taken before its ReLU (the BN output), the pooled vector and logits unchanged."""

    # Outside the feature modules (models.feature_mask): the classifier only, as the zoo's CIFAR ResNets.
    non_feature_modules = ("fc",)

    num_classes: int
    image_size: int = 8
    dtype: object = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False, preact: bool = False):
        h = nn.Conv(16, (3, 3), padding=1, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        h = nn.relu(BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn1")(h, train))
        h = nn.Conv(32, (3, 3), strides=2, padding=1, dtype=self.dtype, name="conv2")(h)
        pre = BatchNorm(groups=self.bn_groups, dtype=self.dtype, name="bn2")(h, train)
        h = nn.relu(pre)
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(pooled).astype(jnp.float32)
        return ([pre if preact else h, pooled], logits) if features else logits


models.register("tiny_cnn", lambda num_classes, image_size, dtype: TinyCNN(num_classes, image_size, dtype))

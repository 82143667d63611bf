"""Building blocks shared by the zoo: PyTorch-semantics BatchNorm and the original's initialisers.

Naming rule (it makes the PyTorch import architecture-agnostic, see ``kdjax.checkpoint.torch_names``): every flax
submodule is named after the PyTorch module path, with a numeric path component glued to the one before it by
``_``. PyTorch ``layer1.0.conv1.weight`` is flax ``params/layer1_0/conv1/kernel``; ``blocks.0.0.conv.3`` is
``blocks_0_0/conv_3``. BatchNorm keeps ``scale``/``bias`` in ``params`` and ``mean``/``var`` in ``batch_stats``.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax import parallel
from kdjax.models import convolution

BN_MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * old + m * batch
BN_EPS = 1e-5

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out), NOT truncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # "normal" is untruncated
# PyTorch's default Conv/Linear weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
normal_001 = nn.initializers.normal(0.01)


def torch_default_bias(fan_in: int):
    """PyTorch's default Conv/Linear bias init: U(+-1/sqrt(fan_in)); fan_in must be given (flax passes only the shape)."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm2d/1d with PyTorch semantics: momentum 0.1, eps 1e-5, running variance updated with the unbiased
    batch variance, statistics in float32 whatever the compute dtype.

    ``groups`` > 1 splits the batch into equal consecutive parts in train mode, normalises each with its own
    statistics and updates the running statistics once per part, in order. One forward over ``concat[x, x']``
    with ``groups=2`` is then exactly two train-mode forwards (on x, then on x'), with half the kernel launches.

    ``updates`` > 1 applies each part's running-statistics update that many times in a row: the original's second
    call of one BN on the same tensor (WRN's ``preact`` features), whose output equals the first call's.
    """

    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool, updates: int = 1):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,))
        if not train:
            inv = jax.lax.rsqrt(running_var.value + BN_EPS) * scale
            return (x.astype(jnp.float32) * inv + (bias - running_mean.value * inv)).astype(self.dtype)
        xg = x.reshape((self.groups, -1) + x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, xg.ndim - 1))  # batch (and spatial) axes of each group
        mean = xg.mean(axis=axes)  # [groups, C]
        var = jnp.maximum((xg * xg).mean(axis=axes) - mean * mean, 0.0)
        if not self.is_initializing():
            n = xg.size // (self.groups * c)  # elements per channel in one group
            m, v = running_mean.value, running_var.value
            for g in range(self.groups):
                for _ in range(updates):  # a repeated call sees the same batch statistics
                    m = (1 - BN_MOMENTUM) * m + BN_MOMENTUM * mean[g]
                    v = (1 - BN_MOMENTUM) * v + BN_MOMENTUM * var[g] * (n / max(n - 1, 1))
            running_mean.value, running_var.value = m, v
        inv = jax.lax.rsqrt(var + BN_EPS) * scale  # [groups, C]
        bshape = (self.groups,) + (1,) * (xg.ndim - 2) + (c,)
        y = xg * inv.reshape(bshape) + (bias - mean * inv).reshape(bshape)
        return y.reshape(x.shape).astype(self.dtype)


def conv(features: int, kernel: int, stride: int, dtype, name: str, kernel_init=kaiming_normal_fan_out,
         groups: int = 1):
    """A bias-free conv with PyTorch's symmetric padding (kernel // 2). Flax's "SAME" would pad (0, 1) at stride 2
    on even sizes and shift every strided output by one pixel relative to the original."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False, dtype=dtype, kernel_init=kernel_init, name=name,
                   conv_general_dilated=convolution_op(groups))


def convolution_op(groups: int = 1):
    """The convolution ``conv`` builds with, chosen when a model is traced: ``convolution.conv_general_dilated``
    (XLA's convolution, its weight gradient reading a materialised input) where ``parallel`` says XLA's weight
    gradients recompute their inputs; else None, flax's ``lax.conv_general_dilated``. Grouped convolutions keep
    the default (not measured)."""
    if groups == 1 and parallel.materialize_weight_gradient_inputs():
        return convolution.conv_general_dilated
    return None


def torch_linear(features: int, fan_in: int, dtype, name: str):
    """nn.Linear with PyTorch's default initialisation (weight and bias U(+-1/sqrt(fan_in)))."""
    return nn.Dense(features, dtype=dtype, kernel_init=torch_default_kernel, bias_init=torch_default_bias(fan_in),
                    name=name)


def global_avg_pool(x, dtype):
    """Mean over the spatial axes of NHWC, accumulated in float32 (also for bfloat16 compute)."""
    return x.astype(jnp.float32).mean(axis=(1, 2)).astype(dtype)

"""Trainable heads of the feature distillers (flax.linen, NHWC), initialised as their PyTorch originals.

* ``Embed``       CRD's projection: Linear(dim_in -> 128) then division by the L2 norm.
* ``ConvReg``     FitNet's regressor from the student's hint map to the teacher's shape: conv3x3 stride 2,
                  transposed conv 4x4 stride 2, or a valid k x k conv, then BatchNorm and ReLU.
* ``VIDRegressor`` VID's 1x1conv-ReLU-1x1conv-ReLU-1x1conv mean predictor plus a per-channel ``log_scale``.

Every conv and linear uses PyTorch's default init, U(+-1/sqrt(fan_in)) for weights and biases.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models import layers


def uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Embed(nn.Module):
    """Linear projection followed by x / ||x||_2 (the original divides without an epsilon)."""

    dim_out: int = 128

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        fan_in = x.shape[-1]
        # Full float32 matmul: the embedding is divided by CRD's temperature 0.07, which magnifies rounding.
        x = nn.Dense(self.dim_out, kernel_init=layers.torch_default_kernel,
                     bias_init=layers.torch_default_bias(fan_in), precision=jax.lax.Precision.HIGHEST,
                     name="linear")(x)
        return x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))


class ConvTranspose4x4s2(nn.Module):
    """PyTorch ``ConvTranspose2d(k=4, stride=2, padding=1)``: doubles H and W.

    The kernel is stored HWIO (``[4, 4, C_in, C_out]``, the PyTorch weight ``[C_in, C_out, 4, 4]`` transposed),
    and applied as PyTorch does: a stride-1 conv of the 2x-dilated input with the spatially flipped kernel and
    padding k - 1 - p = 2. PyTorch computes the init bound from ``weight.size(1) * k * k`` = C_out * 16.
    """

    features: int

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        bound = 1.0 / float(np.sqrt(self.features * 16))
        kernel = self.param("kernel", uniform_init(bound), (4, 4, c_in, self.features))
        bias = self.param("bias", uniform_init(bound), (self.features,))
        y = jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((2, 2), (2, 2)),
                                         lhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def conv_reg_kind(s_shape, t_shape) -> str:
    """Which conv FitNet's ConvReg uses for NHWC shapes ``s_shape`` -> ``t_shape`` (the original's rule on H)."""
    s_h, t_h = s_shape[1], t_shape[1]
    if s_h == 2 * t_h:
        return "conv3x3_s2"
    if 2 * s_h == t_h:
        return "convT4x4_s2"
    if s_h >= t_h:
        return "conv_valid"
    raise ValueError(f"FitNet cannot map a student map of size {s_h} to a teacher map of size {t_h} "
                     "(the original supports H_s = 2 H_t, 2 H_s = H_t or H_s >= H_t); choose another hint_layer")


class ConvReg(nn.Module):
    """FitNet's regressor: conv (by ``conv_reg_kind``) + BatchNorm (PyTorch semantics) + ReLU."""

    s_shape: tuple
    t_shape: tuple
    use_relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        kind = conv_reg_kind(self.s_shape, self.t_shape)
        t_c = self.t_shape[3]
        fan_in = lambda kh, kw: kh * kw * self.s_shape[3]  # noqa: E731
        if kind == "conv3x3_s2":
            x = nn.Conv(t_c, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        kernel_init=layers.torch_default_kernel, bias_init=layers.torch_default_bias(fan_in(3, 3)),
                        name="conv")(x)
        elif kind == "convT4x4_s2":
            x = ConvTranspose4x4s2(t_c, name="conv")(x)
        else:
            kh = 1 + self.s_shape[1] - self.t_shape[1]
            kw = 1 + self.s_shape[2] - self.t_shape[2]
            x = nn.Conv(t_c, (kh, kw), padding="VALID", kernel_init=layers.torch_default_kernel,
                        bias_init=layers.torch_default_bias(fan_in(kh, kw)), name="conv")(x)
        x = layers.BatchNorm(name="bn")(x, train)
        return nn.relu(x) if self.use_relu else x


def vid_log_scale_init(init_pred_var: float, eps: float) -> float:
    """log_scale such that softplus(log_scale) + eps equals ``init_pred_var``."""
    return float(np.log(np.exp(init_pred_var - eps) - 1.0))


class VIDRegressor(nn.Module):
    """VID's predictor of the teacher map's mean, and its per-channel variance parameter ``log_scale``.

    Returns ``(pred_mean, pred_var)`` with ``pred_var = softplus(log_scale) + eps``, shape ``[C_t]``.
    """

    mid_channels: int
    out_channels: int
    init_pred_var: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        def conv1x1(features, name):
            return nn.Conv(features, (1, 1), use_bias=False, kernel_init=layers.torch_default_kernel, name=name)

        x = nn.relu(conv1x1(self.mid_channels, "conv_0")(x))
        x = nn.relu(conv1x1(self.mid_channels, "conv_2")(x))
        mean = conv1x1(self.out_channels, "conv_4")(x)
        start = vid_log_scale_init(self.init_pred_var, self.eps)
        log_scale = self.param("log_scale", nn.initializers.constant(start), (self.out_channels,))
        return mean, jax.nn.softplus(log_scale) + self.eps

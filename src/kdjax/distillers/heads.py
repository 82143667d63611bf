"""Trainable heads of the feature distillers (flax.linen, NHWC), initialised as their PyTorch originals.

* ``Embed``       CRD's projection: Linear(dim_in -> 128) then division by the L2 norm.
* ``ConvReg``     FitNet's regressor from the student's hint map to the teacher's shape: conv3x3 stride 2,
                  transposed conv 4x4 stride 2, or a valid k x k conv, then BatchNorm and ReLU.
* ``VIDRegressor`` VID's 1x1conv-ReLU-1x1conv-ReLU-1x1conv mean predictor plus a per-channel ``log_scale``.
* ``Paraphraser`` FT's convolutional auto-encoder of the teacher's map (3 convs down to ``int(C * k)`` channels,
                  3 transposed convs back, LeakyReLU 0.1 after each, no BatchNorm), trained in the init stage.
* ``Translator``  FT's student-side encoder (3 convs, each followed by BatchNorm and LeakyReLU 0.1).

AB's connectors are ``ConvReg(..., use_relu=False)``. Every conv, transposed conv and linear uses PyTorch's default
init, U(+-1/sqrt(fan_in)) for weights and biases (fan_in of a transposed conv: C_out * kh * kw, PyTorch's
convention for its ``[C_in, C_out, kh, kw]`` weight); BatchNorm starts at scale 1, bias 0.
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


def torch_conv_transpose(x, kernel, bias, stride: int, padding: int):
    """PyTorch's ``conv_transpose2d`` on NHWC ``x`` with an HWIO ``kernel`` (``[kh, kw, C_in, C_out]``, the PyTorch
    weight ``[C_in, C_out, kh, kw]`` transposed by (2, 3, 0, 1)): a stride-1 conv of the ``stride``-dilated input
    with the spatially flipped kernel and padding ``k - 1 - padding``."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    pad = ((kh - 1 - padding, kh - 1 - padding), (kw - 1 - padding, kw - 1 - padding))
    y = jax.lax.conv_general_dilated(x, kernel[::-1, ::-1], window_strides=(1, 1), padding=pad,
                                     lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class ConvTranspose(nn.Module):
    """PyTorch ``ConvTranspose2d(C_in, features, kernel_size, stride, padding)`` (square kernel, with bias).

    Params ``kernel`` ``[k, k, C_in, features]`` and ``bias`` ``[features]``, both U(+-1/sqrt(features * k * k)):
    PyTorch computes the fan-in of a transposed conv's weight from its ``size(1)``, the output channels.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        bound = 1.0 / float(np.sqrt(self.features * k * k))
        kernel = self.param("kernel", uniform_init(bound), (k, k, x.shape[-1], self.features))
        bias = self.param("bias", uniform_init(bound), (self.features,))
        return torch_conv_transpose(x, kernel, bias, self.stride, self.padding)


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
        return torch_conv_transpose(x, kernel, bias, 2, 1)


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


def conv3x3(features: int, c_in: int, name: str):
    """PyTorch ``Conv2d(c_in, features, 3, 1, 1)`` with its default init."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=layers.torch_default_kernel,
                   bias_init=layers.torch_default_bias(9 * c_in), name=name)


def leaky_relu(x):
    """FT's ``LeakyReLU(0.1)``."""
    return nn.leaky_relu(x, 0.1)


def factor_channels(channels: int, k: float) -> int:
    """FT's factor width ``int(C_t * k)`` (PyTorch's ``int``: truncation)."""
    return int(channels * k)


class Paraphraser(nn.Module):
    """FT's paraphraser of the teacher's NHWC map with ``channels`` channels (``use_bn=False``, the original's
    default): encoder conv3x3 C->C, C->F, F->F, decoder transposed conv3x3 (stride 1, padding 1) F->F, F->C, C->C,
    each followed by LeakyReLU 0.1, with F = ``int(C * k)``. Submodules are named after the PyTorch paths
    (``encoder.0`` -> ``encoder_0``; indices 0, 3, 6 of each ``nn.Sequential``).

    ``__call__(x)`` returns ``(factor, reconstruction)``; ``is_factor=True`` only the encoder's ``factor``.
    """

    channels: int
    k: float = 0.5

    @nn.compact
    def __call__(self, x, is_factor: bool = False):
        c, f = self.channels, factor_channels(self.channels, self.k)
        for i, (c_in, c_out) in zip((0, 3, 6), ((c, c), (c, f), (f, f))):
            x = leaky_relu(conv3x3(c_out, c_in, f"encoder_{i}")(x))
        factor = x
        if is_factor:
            return factor
        for i, c_out in zip((0, 3, 6), (f, c, c)):
            x = leaky_relu(ConvTranspose(c_out, 3, 1, 1, name=f"decoder_{i}")(x))
        return factor, x


class Translator(nn.Module):
    """FT's translator of the student's NHWC map (``use_bn=True``, the original's default): conv3x3 C_s->C_s,
    C_s->F, F->F with F = ``int(C_t * k)``, each followed by BatchNorm (PyTorch semantics; statistics in
    ``batch_stats``) and LeakyReLU 0.1. Submodules ``encoder_0``/``encoder_1`` (conv/BN), ``encoder_3``/``_4``,
    ``encoder_6``/``_7``, as the PyTorch paths."""

    in_channels: int
    teacher_channels: int
    k: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = True):
        c, f = self.in_channels, factor_channels(self.teacher_channels, self.k)
        for i, (c_in, c_out) in zip((0, 3, 6), ((c, c), (c, f), (f, f))):
            x = conv3x3(c_out, c_in, f"encoder_{i}")(x)
            x = leaky_relu(layers.BatchNorm(name=f"encoder_{i + 1}")(x, train))
        return x

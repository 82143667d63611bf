"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021; dvlab-research/ReviewKD,
CIFAR-100/model/reviewkd.py and CIFAR-100/train.py).

The student's feature levels, deepest first, pass through one attention-based fusion module (ABF) each: ABF maps
its level to ``mid`` channels (1x1 conv + BN), fuses it with the deeper level's fused map (nearest-upsampled to
this level's size) by a two-channel sigmoid attention (1x1 conv), resizes the result to the teacher level's size
(nearest) and maps it to the teacher level's channels (3x3 conv + BN). The hierarchical context loss (HCL)
compares each output with the teacher's pre-activation feature of that level: the MSE of the maps plus the MSEs of
their 4x4, 2x2 and 1x1 adaptive average pools (those smaller than the map), weighted 1/2, 1/4, 1/8 and normalised
by the sum of the weights; summed over the levels.

Levels (both models): ``f[1:]`` of the feature list, the pooled vector as a 1x1 map (the official code reads the
student's ``is_feat`` list the same way: its ``zip`` drops the stem f[0]); the teacher's are its pre-activation
features (``teacher_preact``). The official ``build_review_kd`` hard-codes, per student, the channels and sizes that
kdjax reads from the two models' feature shapes: ``in_channels`` (the student's levels), ``out_channels`` and
``out_shapes`` (the teacher's), ``shapes`` (the student's sizes) and ``mid_channel = min(512, in_channels[-1])``.
tests/test_review.py checks the derived values against the official table for its CIFAR-100 pairs.

The loss weight is ``loss.beta`` (per pair: ``kdjax.configs.recipes``, from the official script/reviewKD.sh;
default 1, the official --kd-loss-weight default), ramped in over ``warmup`` epochs as the official train.py does,
``min(1, epoch / warmup)`` with its epochs counted from 0: kdjax's 1-based epoch e gives ``(e - 1) / warmup``.
"""
import dataclasses
from typing import ClassVar, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.distillers.interface import (Distiller, adaptive_avg_pool, check_feature_list, check_map, shape_of,
                                        student_features, teacher_features)
from kdjax.distillers.registry import option, register
from kdjax.models import layers

# The official CIFAR-100 settings: train.py --kd-warm-up 20 and --kd-loss-weight 1 (the per-pair weights of
# script/reviewKD.sh are in kdjax.configs.recipes); model/reviewkd.py's cap on the ABF width and HCL's pool sizes.
REVIEWKD_CIFAR100 = dict(ce_weight=1.0, kd_weight=1.0, warmup_epochs=20)
MAX_MID_CHANNELS = 512
HCL_POOL_SIZES = (4, 2, 1)

# nn.init.kaiming_uniform_(w, a=1) of ABF's two convs: U(+-sqrt(3 / fan_in)) (gain 1).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """PyTorch's ``F.interpolate(mode='nearest')`` source index of each output position along one axis:
    ``min(floor(i * (in / out)), in - 1)`` with the scale in float32, as its kernels compute it."""
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, size_in - 1)


def nearest_resize(x, size: int):
    """``F.interpolate(x, (size, size), mode='nearest')`` on an NHWC map (a static gather; identity when the size
    is already ``size``)."""
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (size, size):
        return x
    return x[:, nearest_indices(h, size)][:, :, nearest_indices(w, size)]


def hcl_loss(fs_list, ft_list):
    """The hierarchical context loss: for each level, (MSE of the maps + sum over l in (4, 2, 1), l < H, of
    2^-k MSE of their l x l adaptive average pools) / (1 + sum of those 2^-k); summed over the levels."""
    total = jnp.zeros((), jnp.float32)
    for f_s, f_t in zip(fs_list, ft_list):
        loss, weight, norm = jnp.mean((f_s - f_t) ** 2), 1.0, 1.0
        for size in HCL_POOL_SIZES:
            if size >= f_s.shape[1]:
                continue
            weight /= 2.0
            pooled_s, pooled_t = adaptive_avg_pool(f_s, (size, size)), adaptive_avg_pool(f_t, (size, size))
            loss = loss + weight * jnp.mean((pooled_s - pooled_t) ** 2)
            norm += weight
        total = total + loss / norm
    return total


def warmup_factor(epoch, warmup: int):
    """The official ramp ``min(1, epoch0 / warmup)`` with its 0-based epoch, from kdjax's 1-based ``epoch``
    (0 during the first epoch); 1 when ``warmup`` is 0."""
    if int(warmup) == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum((jnp.asarray(epoch, jnp.float32) - 1.0) / float(warmup), 1.0)


class ABF(nn.Module):
    """One attention-based fusion module; submodules named after the PyTorch paths (``conv1.0`` -> ``conv1_0``).

    ``__call__(x, residual, out_size, train)`` returns ``(output, fused)``: ``output`` the level's map in the
    teacher's channels and size, ``fused`` the map passed on to the next (shallower) level. ``fuse`` False (the
    deepest level) ignores ``residual``."""

    mid_channels: int
    out_channels: int
    fuse: bool

    @nn.compact
    def __call__(self, x, residual, out_size: int, train: bool = True):
        x = nn.Conv(self.mid_channels, (1, 1), use_bias=False, kernel_init=kaiming_uniform_a1, name="conv1_0")(x)
        x = layers.BatchNorm(name="conv1_1")(x, train)
        if self.fuse:
            residual = nearest_resize(residual, x.shape[1])
            z = jnp.concatenate([x, residual], axis=-1)
            z = nn.sigmoid(nn.Conv(2, (1, 1), kernel_init=layers.torch_default_kernel,
                                   bias_init=layers.torch_default_bias(2 * self.mid_channels),
                                   precision=jax.lax.Precision.HIGHEST, name="att_conv_0")(z))
            x = x * z[..., 0:1] + residual * z[..., 1:2]
        x = nearest_resize(x, out_size)
        y = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=kaiming_uniform_a1, name="conv2_0")(x)
        return layers.BatchNorm(name="conv2_1")(y, train), x


def levels(feats) -> List:
    """``f[1:]`` with the pooled ``[B, D]`` vector as a ``[B, 1, 1, D]`` map (arrays or ShapeDtypeStructs)."""
    out = list(feats[1:-1])
    last = feats[-1]
    if len(shape_of(last)) == 2:
        b, d = shape_of(last)
        last = (jax.ShapeDtypeStruct((b, 1, 1, d), last.dtype) if isinstance(last, jax.ShapeDtypeStruct)
                else jnp.reshape(last, (b, 1, 1, d)))
    return out + [last]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The per-pair settings of the official ``build_review_kd``, in its order (shallowest level first)."""
    in_channels: Tuple[int, ...]   # the student's level channels
    out_channels: Tuple[int, ...]  # the teacher's
    shapes: Tuple[int, ...]        # the student's level sizes (H = W)
    out_shapes: Tuple[int, ...]    # the teacher's
    mid_channels: int


@register
@dataclasses.dataclass(frozen=True)
class ReviewKD(Distiller):
    """ReviewKD: the ABFs over the student's levels and HCL against the teacher's pre-activation levels.

    params = ``{'abfs_0': ..., 'abfs_1': ...}`` (``abfs_0`` the deepest level, the official ``self.abfs`` order);
    state = their BatchNorm statistics, ``{'batch_stats': {'abfs_k': ...}}``, in train mode during training as the
    original's. The term is HCL times the warm-up factor of the step's epoch (``term_scale``)."""

    name: ClassVar[str] = "reviewkd"
    uses_features: ClassVar[bool] = True
    teacher_preact: ClassVar[bool] = True
    term_follows_epoch: ClassVar[bool] = True
    beta: float = REVIEWKD_CIFAR100["kd_weight"]
    warmup: int = option(REVIEWKD_CIFAR100["warmup_epochs"], "epochs over which its loss ramps in (0: none)")
    mid_channels: int = option(0, "ABF width (0: min(512, the student's last level width), the official rule)")

    def __post_init__(self):
        if int(self.warmup) < 0:
            raise ValueError(f"distill.warmup must be >= 0 epochs, got {self.warmup}")
        if int(self.mid_channels) < 0:
            raise ValueError(f"distill.mid_channels must be >= 0 (0: the official rule), got {self.mid_channels}")

    def layout(self, feats_s, feats_t) -> Layout:
        check_feature_list(feats_s, "student", 2)
        check_feature_list(feats_t, "teacher", 2)
        lv_s, lv_t = levels(feats_s), levels(feats_t)
        if len(lv_s) != len(lv_t):
            raise ValueError(f"ReviewKD pairs the student's and the teacher's feature levels (f[1:]) one to one, "
                             f"but the student has {len(lv_s)} and the teacher {len(lv_t)}: choose a teacher and "
                             "a student with as many stages, or another distiller")
        for i, (s, t) in enumerate(zip(lv_s, lv_t), start=1):
            check_map(shape_of(s), f"student feature {i}")
            check_map(shape_of(t), f"teacher feature {i}")
        in_channels = tuple(shape_of(f)[3] for f in lv_s)
        mid = int(self.mid_channels) or min(MAX_MID_CHANNELS, in_channels[-1])
        return Layout(in_channels=in_channels, out_channels=tuple(shape_of(f)[3] for f in lv_t),
                      shapes=tuple(shape_of(f)[1] for f in lv_s), out_shapes=tuple(shape_of(f)[1] for f in lv_t),
                      mid_channels=mid)

    def check_shapes(self, feats_s, feats_t) -> None:
        self.layout(feats_s, feats_t)

    @staticmethod
    def _abf_names(n: int) -> List[str]:
        return [f"abfs_{k}" for k in range(n)]

    def _modules(self, layout: Layout):
        """``[(name, ABF, level index)]`` deepest level first, as the official forward runs them."""
        n = len(layout.in_channels)
        return [(name, ABF(layout.mid_channels, layout.out_channels[n - 1 - k], fuse=k > 0), n - 1 - k)
                for k, name in enumerate(self._abf_names(n))]

    def init(self, key, feats_s, feats_t, num_train=None, train_labels=None):
        layout = self.layout(feats_s, feats_t)
        lv_s = levels(feats_s)
        params, stats, residual = {}, {}, None
        for k_abf, (name, module, i) in zip(jax.random.split(key, len(lv_s)), self._modules(layout)):
            b, h, w, c = shape_of(lv_s[i])
            x = jnp.zeros((1, h, w, c), jnp.float32)
            variables = module.init(k_abf, x, residual, layout.out_shapes[i], train=False)
            _, residual = module.apply(variables, x, residual, layout.out_shapes[i], train=False)
            params[name], stats[name] = variables["params"], variables["batch_stats"]
        return params, {"batch_stats": stats}

    def fuse(self, params, state, feats_s, layout: Layout, train: bool):
        """The ABF outputs, shallowest level first (the official ``results``), and the new state: in train mode
        each ABF's BatchNorm statistics updated, as ``apply_bn_head`` does for a single-input head."""
        lv_s = levels(student_features(feats_s))
        outputs, residual, stats = [None] * len(lv_s), None, dict(state["batch_stats"])
        for name, module, i in self._modules(layout):
            variables = {"params": params[name], "batch_stats": stats[name]}
            if train:
                (outputs[i], residual), updates = module.apply(variables, lv_s[i], residual, layout.out_shapes[i],
                                                               train=True, mutable=["batch_stats"])
                stats[name] = updates["batch_stats"]
            else:
                outputs[i], residual = module.apply(variables, lv_s[i], residual, layout.out_shapes[i], train=False)
        return outputs, {**state, "batch_stats": stats}

    def loss(self, params, state, feats_s, feats_t, *, labels=None, indices=None, key=None, train=True):
        layout = self.layout(feats_s, feats_t)
        outputs, state = self.fuse(params, state, feats_s, layout, train)
        return hcl_loss(outputs, levels(teacher_features(feats_t))), state

    def term_scale(self, epoch):
        return warmup_factor(epoch, self.warmup)


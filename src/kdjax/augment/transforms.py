"""What every batch goes through around a scheme: the base training transform (per-sample crop+flip, then
normalisation), the conversions between uint8 pixels and normalised floats, and the label targets of a mixed
batch.

Everything here runs on the accelerator and is jittable with static shapes.

The original loader applies, per sample, ``RandomCrop(S, padding=S//8)`` (zero padding) and
``RandomHorizontalFlip(0.5)`` to the uint8 image, then ``ToTensor`` (``u / 255``) and
``Normalize(mean, std)`` (``(t - mean) / std``), all in float32 (docs/fidelity.md, "Base pipeline"). The schemes flip, crop_flip and
autoaugment go back to uint8 with ``(std * x + mean) * 255`` and a truncating cast (same section): about a
quarter of the 256 x 3 channel values come back one level lower (173 of 768 with the CIFAR-100 statistics).
``normalize`` and ``to_uint8_truncating`` reproduce those float32 results bit for bit (checked against torch
2.13 on CPU), through small lookup tables, because XLA rewrites and fuses the float arithmetic.

torch's float -> uint8 cast (``tensor.to(torch.uint8)``) truncates toward zero and goes through int64, so values
outside [0, 256) wrap modulo 256 (checked with torch 2.13, CPU: -1.5 -> 255, -300 -> 212, 256.7 -> 0,
300 -> 44; -0.4 -> 0, 255.9 -> 255). In the original the argument is the de-normalised base-transformed batch,
which lies in [0, 255] up to float rounding, so no value wraps there. ``to_uint8_truncating`` clamps to
[0, 255] before truncating: it agrees with torch on every value in (-1, 256) and maps anything further out to
the nearest end instead of wrapping.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Pixels within this distance of an integer after de-normalisation are taken to be normalised uint8 values:
# XLA contracts and reorders the float32 arithmetic, which moves them by up to about one ulp at 255 (1.5e-5).
# Ordinary floats this close to an integer are read from the table too; for them the original's own result
# hinges on the last bit of a float32 product that no compiler reproduces anyway.
_PIXEL_TOLERANCE = 1e-4


def _channel_constant(values: Sequence[float], name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError(f"{name} must be concrete per-channel numbers (dataset statistics), not traced "
                         f"values: {err}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a sequence of per-channel values, e.g. (0.5071, 0.4867, 0.4408); "
                         f"got shape {arr.shape}")
    return arr


def _check_nhwc(images, what: str, channels: int = None) -> None:
    if images.ndim != 4:
        raise ValueError(f"{what} must be a batch in NHWC layout [N, H, W, C]; got shape {images.shape}")
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(f"{what} has {images.shape[-1]} channels but mean/std have {channels}; pass NHWC "
                         f"images and per-channel statistics of the same length")


def normalize_table(mean, std) -> np.ndarray:
    """[256, C] float32: ``(v / 255 - mean) / std`` for every uint8 value v, in IEEE float32 as torch does it.

    ToTensor divides by 255 and Normalize subtracts and divides, each step correctly rounded. XLA rewrites a
    division by a broadcast constant into a multiplication by its reciprocal, which moves some results by an
    ulp; the lookup table keeps the values bit-identical to the original's on every backend.
    """
    mean = _channel_constant(mean, "mean")
    std = _channel_constant(std, "std")
    if mean.shape != std.shape:
        raise ValueError(f"mean and std need one value per channel each; got {mean.size} and {std.size}")
    pixels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    return ((pixels - mean) / std).astype(np.float32)


def truncation_table(mean, std) -> np.ndarray:
    """[256, C] uint8: what the original's ``(std * x + mean) * 255`` then ``.to(uint8)`` gives back for the
    normalised value x of every uint8 pixel v; either v or v - 1, depending on float32 rounding."""
    mean = _channel_constant(mean, "mean")
    std = _channel_constant(std, "std")
    scaled = (std * normalize_table(mean, std) + mean) * np.float32(255.0)
    return np.floor(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _lookup(table: np.ndarray, values_uint8) -> jnp.ndarray:
    """table[v, c] for every pixel v of channel c of an NHWC batch."""
    channels = np.arange(table.shape[1], dtype=np.int32)
    return jnp.asarray(table)[values_uint8.astype(jnp.int32), channels]


def normalize(images_uint8, mean, std) -> jnp.ndarray:
    """uint8 [0, 255] -> normalised float32: ``(u / 255 - mean) / std`` per channel (ToTensor + Normalize),
    bit-identical to torch's float32 result (done by table lookup, see ``normalize_table``)."""
    table = normalize_table(mean, std)
    _check_nhwc(images_uint8, "images_uint8", table.shape[1])
    if images_uint8.dtype != jnp.uint8:
        raise ValueError(f"normalize expects uint8 pixels in [0, 255]; got dtype {images_uint8.dtype} "
                         f"(cast with .astype(jnp.uint8) first)")
    return _lookup(table, images_uint8)


def denormalize(images_normalized, mean, std) -> jnp.ndarray:
    """Normalised float -> [0, 1] pixel units: ``std * x + mean`` (the original's ``denormalize_image``)."""
    mean = _channel_constant(mean, "mean")
    std = _channel_constant(std, "std")
    return std * images_normalized.astype(jnp.float32) + mean


def to_uint8_truncating(images_normalized, mean, std) -> jnp.ndarray:
    """The original's ``(denormalize(x) * 255).to(uint8)``: truncation toward zero, after clamping to [0, 255].

    The product is truncated, not rounded, so a pixel that comes back as 254.99998 becomes 254: the small
    quantisation bias the original adds even when the transform that follows is a no-op. For inputs that are
    normalised uint8 pixels (what the base transform produces) the result is read from ``truncation_table``, so
    exactly the pixels that lose a level in the original lose it here, whatever the compiler does to the float
    arithmetic; other values are truncated directly.
    """
    mean_arr = _channel_constant(mean, "mean")
    _check_nhwc(images_normalized, "images_normalized", mean_arr.size)
    scaled = denormalize(images_normalized, mean, std) * jnp.float32(255.0)
    # Clamp first: casting an out-of-range float to an unsigned integer is undefined in XLA as it is in C++.
    clamped = jnp.clip(scaled, 0.0, 255.0)
    nearest = jnp.round(clamped)
    is_pixel = jnp.abs(clamped - nearest) <= _PIXEL_TOLERANCE
    from_table = _lookup(truncation_table(mean, std), nearest.astype(jnp.uint8))
    return jnp.where(is_pixel, from_table, jnp.floor(clamped).astype(jnp.uint8))


def default_pad(image_size: int) -> int:
    """Crop padding of the original: 4 px at 32x32, 8 px at 64x64 (28 at 224), i.e. image_size // 8."""
    return int(image_size) // 8


def draw_crop_flip(key, batch, pad: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Parameters of crop+flip: offsets (top, left) uniform in [0, 2*pad] and fair flip coins.

    ``batch`` = N gives per-sample draws (offsets [N, 2], flips [N]); ``batch`` = None gives one draw for the
    whole batch (offsets [2], flips [])."""
    lead = () if batch is None else (batch,)
    key_offset, key_flip = jax.random.split(key)
    offsets = jax.random.randint(key_offset, lead + (2,), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(key_flip, 0.5, lead)
    return offsets, flips


def pad_zeros(images, pad: int) -> jnp.ndarray:
    """Zero (black) padding of ``pad`` pixels on each side of H and W."""
    return jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def apply_crop_flip(images, offsets, flips, pad: int) -> jnp.ndarray:
    """Crop ``images`` [N, H, W, C] out of their zero-padded copies at ``offsets`` (top, left) and mirror them
    horizontally where ``flips`` is true. ``offsets`` is [2] with ``flips`` [] (one draw for the whole batch,
    as torchvision does on a batch tensor) or [N, 2] with [N] (one per image). Keeps shape and dtype."""
    _check_nhwc(images, "images")
    n, h, w, c = images.shape
    padded = pad_zeros(images, pad)
    if offsets.ndim == 1:
        cropped = jax.lax.dynamic_slice(padded, (0, offsets[0], offsets[1], 0), (n, h, w, c))
        return jnp.where(flips, cropped[:, :, ::-1, :], cropped)

    def crop_one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    cropped = jax.vmap(crop_one)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def base_train_transform(key, images_uint8, pad: int) -> jnp.ndarray:
    """The loader's per-sample RandomCrop(padding=pad, zero fill) + RandomHorizontalFlip(0.5), on uint8 NHWC.

    Every image gets its own offset and coin, as the original DataLoader draws them. Returns uint8.
    """
    _check_nhwc(images_uint8, "images_uint8")
    if pad < 0:
        raise ValueError(f"pad must be >= 0 (4 for 32x32, 8 for 64x64); got {pad}")
    offsets, flips = draw_crop_flip(key, images_uint8.shape[0], pad)
    return apply_crop_flip(images_uint8, offsets, flips, pad)


def base_train_batch(key, images_uint8, mean, std, pad: int) -> jnp.ndarray:
    """The batch x every step starts from: ``base_train_transform`` then ``normalize`` (the original's loader)."""
    return normalize(base_train_transform(key, images_uint8, pad), mean, std)


# ---------------------------------------------------------------------------------------------- label targets


def mix_labels(labels, partner, lam, num_classes: int, source=None) -> jnp.ndarray:
    """Soft targets ``lam * y[source] + (1 - lam) * y[partner]`` [rows, C] of mixed images (Mixup, CutMix,
    CutMixPick); ``source`` None is the batch itself. ``lam`` is a scalar or one value per row."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    kept = onehot if source is None else onehot[source]
    lam = jnp.asarray(lam, jnp.float32)
    lam = lam.reshape(lam.shape + (1,) * (2 - lam.ndim)) if lam.ndim else lam
    return lam * kept + (1.0 - lam) * onehot[partner]


def mixed_targets(aux: dict, labels, num_classes: int, rows: int) -> jnp.ndarray:
    """Soft targets [rows, C] of a scheme's batch x': those the scheme gives (``aux['targets']``), its label mixing
    (``aux['lam']`` and ``aux['perm']``), or one-hot labels for a label-preserving scheme."""
    if "targets" in aux:
        return aux["targets"]
    if "lam" in aux and "perm" in aux:
        return mix_labels(labels, aux["perm"], aux["lam"], num_classes)
    if rows != labels.shape[0] or "picked" in aux:
        raise ValueError("the scheme picks or mixes images but gives no label targets (aux['targets']): create it "
                         "with dataset_stats that carry num_classes")
    return jax.nn.one_hot(labels, num_classes)


def dominant_labels(aux: dict, labels, num_classes: int, rows: int) -> jnp.ndarray:
    """The label [rows] of each image of x': its own for a label-preserving scheme, and for a mixed image (Mixup,
    CutMix, CutMixPick) the label of the larger part, the one whose weight in ``mixed_targets`` is >= 0.5. At an
    exact tie (weights 0.5 and 0.5 of two different classes) the lower class index wins (argmax's first maximum)."""
    return jnp.argmax(mixed_targets(aux, labels, num_classes, rows), axis=-1).astype(jnp.int32)

"""AutoAugment (Cubuk et al.) on uint8 NHWC batches, jittable, with torchvision's tensor-op semantics.

What the original does (docs/fidelity.md, "AutoAugment"): its scheme de-normalises the batch, truncates it to uint8
and hands the [N, C, H, W] tensor to torchvision 0.10's ``AutoAugment`` (NEAREST interpolation, no fill, so
black), which draws ONE sub-policy, two probability coins and two signs for the whole batch. The CIFAR10 policy
serves CIFAR-100, the IMAGENET policy Tiny ImageNet. ``autoaugment`` does the same by default;
``per_sample=True`` draws one sub-policy per image instead (an extension, not the original's behaviour).

Everything is traced: the sub-policy, the op indices, magnitude bins and signs are arrays, every op is a branch
of one ``lax.switch``, and magnitudes are read out of per-op tables with the traced bin, so a jitted step
compiles once per image shape and policy, whatever the keys.

**Op definitions** follow torchvision's tensor functions on uint8 (F.affine / F.rotate through grid_sample,
F.adjust_*, F.posterize, F.solarize, F.autocontrast, F.equalize, F.invert):

* geometric ops map every output pixel centre, in coordinates relative to the image centre, through torchvision's
  inverse affine matrix divided by half the image size (``_gen_affine_grid``), un-normalise as grid_sample does
  with ``align_corners=False`` and take the nearest source pixel (round half to even); outside is 0. The
  arithmetic is float32 in torch's order, which is why this is a small gather and not dm_pix's
  ``affine_transform``, whose coordinate convention and rounding would differ from torch's at ties;
* Brightness / Color / Contrast / Sharpness blend with black / the grayscale image (weights 0.2989, 0.587,
  0.114, truncated to uint8) / the grayscale mean / the 3x3 smoothing [[1,1,1],[1,5,1],[1,1,1]]/13 (rounded,
  border pixels kept) as ``ratio*img + (1-ratio)*other`` in float32, clamped to [0, 255] and truncated;
* Posterize keeps the top ``bits`` bits; Solarize inverts pixels >= threshold; AutoContrast stretches each
  channel's [min, max] to [0, 255] (truncating); Equalize is torchvision's per-channel histogram LUT; Invert is
  255 - x.

**Magnitudes** (10 bins; signed ops are negated with probability 1/2): shear 0..0.3, translate 0..150/331 of
the size, rotate 0..30 degrees, blend factors 1 +- (0..0.9), posterize bits [8,8,7,7,6,6,5,5,4,4], solarize
thresholds from linspace. All come out of ``torch.linspace`` in float32, reproduced by ``_torch_linspace``.

**semantics** selects the torchvision release. ``"0.10"`` (the default; what the original ran):

* ShearX/ShearY: ``F.affine(shear=degrees(m))`` about the image centre, i.e. a pixel shear factor of tan(m);
* TranslateX/Y: ``int(m * width)`` (resp. height) pixels with m in linspace(0, 150/331);
* Solarize thresholds linspace(256, 0): bin 0 (256) leaves every pixel unchanged;
* AutoContrast on a batch: when any channel of an image is flat, that whole image is left unchanged (0.10 found
  the flat channels with ``torch.where(min == max)[0]``, which on an [N, C, 1, 1] tensor indexes images, not
  channels); otherwise per channel.

``"current"`` is torchvision's present definition (checked against 0.29.1): shear factor m (``atan``) about the
top-left corner, ``int(m)`` with m in linspace(0, 150/331 * size), thresholds linspace(255, 0) (bin 0 inverts
pixels equal to 255), AutoContrast per channel. The other ten ops are the same in both.

**Float arithmetic.** torch evaluates ``ratio*img + (1-ratio)*other`` as separate tensor ops, each rounded to
float32; XLA fuses a multiply feeding an add into one fused multiply-add, which rounds once and moves results
that sit on an integer (a border pixel under Sharpness, a grey pixel under Color) to the other side of the
truncation. Products of a factor with a uint8 value are therefore read from 256-entry float32 tables computed
on the host, leaving XLA only the additions; the one remaining product (Contrast's factor times the grey mean)
is kept out of the addition by ``_unfused``. Geometric coordinates are computed on the device in float32; they
can differ from torch's only at exact rounding ties.
"""
import functools
import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

OP_NAMES: Tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
    "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_INDEX: Dict[str, int] = {name: i for i, name in enumerate(OP_NAMES)}
IDENTITY = OP_INDEX["Identity"]
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                        "Contrast", "Sharpness"})
MAGNITUDE_FREE_OPS = frozenset({"Identity", "AutoContrast", "Equalize", "Invert"})
GEOMETRIC_OPS: Tuple[str, ...] = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLEND_OPS: Tuple[str, ...] = ("Brightness", "Color", "Contrast", "Sharpness")
NUM_BINS = 10
SEMANTICS: Tuple[str, ...] = ("0.10", "current")

# (op, probability, magnitude bin or None) pairs; the 25 sub-policies of the AutoAugment paper as torchvision
# lists them, in the same order (the order matters: the sub-policy index is drawn uniformly from it).
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
POLICIES = {"cifar10": CIFAR10_POLICY, "imagenet": IMAGENET_POLICY}

# rgb_to_grayscale's weights, as torch applies them: each a Python float turned float32 for the uint8 product.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------------------
# Argument checks (one-line errors that say what to pass)

def _check_images(images) -> Tuple[int, int]:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"AutoAugment needs an RGB batch [N, H, W, 3] in NHWC layout; got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"AutoAugment works on uint8 pixels in [0, 255]; got dtype {images.dtype} "
                         f"(round-trip through kdjax.augment.transforms.to_uint8_truncating first)")
    return int(images.shape[1]), int(images.shape[2])


def _check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; valid: {', '.join(repr(s) for s in SEMANTICS)} "
                         f"('0.10' is the torchvision release the original ran)")
    return semantics


def _check_op(op_name: str) -> int:
    if op_name not in OP_INDEX:
        raise ValueError(f"unknown AutoAugment op {op_name!r}; valid ops: {', '.join(OP_NAMES)}")
    return OP_INDEX[op_name]


def _check_policy(policy: str) -> str:
    name = policy.lower() if isinstance(policy, str) else policy
    if name not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; valid policies: {', '.join(POLICIES)}")
    return name


def _bin_index(op_name: str, magnitude_bin):
    if magnitude_bin is None:
        if op_name not in MAGNITUDE_FREE_OPS:
            raise ValueError(f"{op_name} needs a magnitude_bin in 0..{NUM_BINS - 1}")
        return jnp.int32(0)
    if isinstance(magnitude_bin, (int, np.integer)) and not 0 <= int(magnitude_bin) < NUM_BINS:
        raise ValueError(f"magnitude_bin must be in 0..{NUM_BINS - 1}; got {magnitude_bin}")
    return jnp.asarray(magnitude_bin, dtype=jnp.int32)


def _sign_index(sign):
    """0 for a positive magnitude, 1 for a negated one (the second axis of every magnitude table)."""
    if isinstance(sign, (int, float, np.integer, np.floating)) and sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1; got {sign}")
    return (jnp.asarray(sign) < 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Magnitudes and per-op tables (host side, static per image size and semantics)

def _torch_linspace(start: float, end: float, steps: int = NUM_BINS) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 as torch's CPU kernel computes it: a float32 step, the
    first half counted up from start and the second half down from end, each point one fused multiply-add of
    float32 operands (a float64 product and sum rounded once to float32 gives the same)."""
    start32, end32 = np.float32(start), np.float32(end)
    step32 = np.float32((end32 - start32) / np.float32(steps - 1))
    half = steps // 2
    points = [np.float64(start32) + np.float64(step32) * i if i < half
              else np.float64(end32) - np.float64(step32) * (steps - 1 - i) for i in range(steps)]
    return np.asarray(points, dtype=np.float64).astype(np.float32)


def _magnitude_grid(op_name: str, image_size: Tuple[int, int], semantics: str) -> Optional[np.ndarray]:
    height, width = image_size
    if op_name in ("ShearX", "ShearY"):
        return _torch_linspace(0.0, 0.3)
    if op_name in ("TranslateX", "TranslateY"):
        if semantics == "0.10":
            return _torch_linspace(0.0, 150.0 / 331.0)  # a fraction of the size; int(size * m) pixels
        size = width if op_name == "TranslateX" else height
        return _torch_linspace(0.0, 150.0 / 331.0 * size)  # pixels; int(m)
    if op_name == "Rotate":
        return _torch_linspace(0.0, 30.0)
    if op_name in BLEND_OPS:
        return _torch_linspace(0.0, 0.9)
    if op_name == "Posterize":
        # 0.10 listed [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]; later releases compute the same values with this formula.
        return (8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / 4))).astype(np.float32)
    if op_name == "Solarize":
        return _torch_linspace(256.0 if semantics == "0.10" else 255.0, 0.0)
    return None


def magnitude(op_name: str, magnitude_bin: Optional[int], sign: int = 1, image_size: Tuple[int, int] = (32, 32),
              semantics: str = "0.10") -> float:
    """The magnitude torchvision's AutoAugment hands to ``op_name`` for this bin and sign (host-side float).

    Signed ops return ``sign * grid[bin]``; unsigned ops ignore ``sign``; ops without a magnitude return 0.0.
    ``image_size`` is (height, width); only the translations depend on it, and only under ``"current"``
    semantics (0.10 returns a fraction of the size there).
    """
    _check_op(op_name)
    _check_semantics(semantics)
    grid = _magnitude_grid(op_name, image_size, semantics)
    if grid is None:
        return 0.0
    if magnitude_bin is None or not 0 <= int(magnitude_bin) < NUM_BINS:
        raise ValueError(f"{op_name} needs a magnitude_bin in 0..{NUM_BINS - 1}; got {magnitude_bin}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1; got {sign}")
    value = float(grid[int(magnitude_bin)])
    return -value if (op_name in SIGNED_OPS and sign < 0) else value


def _inverse_affine_matrix(center, angle: float, translate, shear) -> np.ndarray:
    """torchvision's inverse affine matrix (output -> input pixel) for rotation ``angle`` and ``shear`` angles
    in degrees, then ``translate``, all about ``center``, in coordinates whose origin is the image centre; scale 1.
    Evaluated in float64 as torchvision does in Python; 6 values, row-major [2, 3]."""
    rot, shear_x, shear_y = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    # Forward rotation-shear block R(rot) @ ShearY(shear_y) @ ShearX(shear_x), determinant 1.
    a = math.cos(rot - shear_y) / math.cos(shear_y)
    b = -math.cos(rot - shear_y) * math.tan(shear_x) / math.cos(shear_y) - math.sin(rot)
    c = math.sin(rot - shear_y) / math.cos(shear_y)
    d = -math.sin(rot - shear_y) * math.tan(shear_x) / math.cos(shear_y) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]  # its inverse
    # Undo translation and centre, then re-apply the centre (the same sums, in the same order, as torchvision).
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return np.asarray(m, dtype=np.float64)


def _geometric_matrix(op_name: str, m: float, height: int, width: int, semantics: str) -> np.ndarray:
    """The inverse matrix torchvision builds for one geometric op with signed magnitude ``m``."""
    centre = (0.0, 0.0)  # F.affine / F.rotate without ``center``: the image centre
    top_left = (-width * 0.5, -height * 0.5)  # ``center=[0, 0]`` in pixels, relative to the image centre
    if op_name in ("ShearX", "ShearY"):
        if semantics == "0.10":
            angle, center = math.degrees(m), centre
        else:
            angle, center = math.degrees(math.atan(m)), top_left
        shear = (angle, 0.0) if op_name == "ShearX" else (0.0, angle)
        return _inverse_affine_matrix(center, 0.0, (0.0, 0.0), shear)
    if op_name in ("TranslateX", "TranslateY"):
        size = width if op_name == "TranslateX" else height
        pixels = float(int(size * m)) if semantics == "0.10" else float(int(m))
        translate = (pixels, 0.0) if op_name == "TranslateX" else (0.0, pixels)
        return _inverse_affine_matrix(centre, 0.0, translate, (0.0, 0.0))
    if op_name == "Rotate":
        # F.rotate negates the angle for its matrix (counter-clockwise rotation of the content).
        return _inverse_affine_matrix(centre, -m, (0.0, 0.0), (0.0, 0.0))
    raise ValueError(f"{op_name} is not a geometric op; geometric ops: {', '.join(GEOMETRIC_OPS)}")


def _normalised_theta(matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """[3, 2] float32: the matrix as torch uses it in ``_gen_affine_grid``: float32, transposed, each output
    column divided by half the width (x) or height (y)."""
    theta = matrix.astype(np.float32).reshape(2, 3)
    return theta.T / np.asarray([0.5 * width, 0.5 * height], dtype=np.float32)


def _blend_factors(bin_index: int, sign: int) -> Tuple[np.float32, np.float32]:
    """(ratio, 1 - ratio) of ``_blend`` as float32 scalars: ratio = 1 + m in float64, each then rounded."""
    ratio = 1.0 + sign * float(_torch_linspace(0.0, 0.9)[bin_index])
    return np.float32(ratio), np.float32(1.0 - ratio)


@functools.lru_cache(maxsize=None)
def _tables(height: int, width: int, semantics: str) -> Dict[str, np.ndarray]:
    """Every magnitude-dependent constant, indexed [bin, sign index] (sign index 0: +, 1: -)."""
    signs = (1, -1)
    levels = np.arange(256, dtype=np.float32)
    theta = np.zeros((len(GEOMETRIC_OPS), NUM_BINS, 2, 3, 2), np.float32)
    for k, op_name in enumerate(GEOMETRIC_OPS):
        for b in range(NUM_BINS):
            for s, sign in enumerate(signs):
                m = magnitude(op_name, b, sign, (height, width), semantics)
                theta[k, b, s] = _normalised_theta(_geometric_matrix(op_name, m, height, width, semantics),
                                                   height, width)
    keep = np.zeros((NUM_BINS, 2, 256), np.float32)  # ratio * v, rounded to float32
    other = np.zeros((NUM_BINS, 2, 256), np.float32)  # (1 - ratio) * v
    other_factor = np.zeros((NUM_BINS, 2), np.float32)
    for b in range(NUM_BINS):
        for s, sign in enumerate(signs):
            ratio, rest = _blend_factors(b, sign)
            keep[b, s], other[b, s], other_factor[b, s] = ratio * levels, rest * levels, rest
    # Brightness blends with black: ratio*v + (1-ratio)*0, clamped and truncated, is a plain lookup.
    brightness = np.floor(np.clip(keep, 0.0, 255.0)).astype(np.uint8)
    bits = np.asarray([magnitude("Posterize", b) for b in range(NUM_BINS)], dtype=np.int64)
    posterize_mask = ((0xFF << (8 - bits)) & 0xFF).astype(np.uint8)
    thresholds = np.asarray([magnitude("Solarize", b, semantics=semantics) for b in range(NUM_BINS)])
    # torch compares the float pixel with the float threshold: v >= t  <=>  v >= ceil(t) for integer v.
    solarize_from = np.ceil(thresholds).astype(np.int32)
    gray = np.stack([np.float32(w) * levels for w in _GRAY_WEIGHTS])  # [3, 256]
    return dict(theta=theta, keep=keep, other=other, other_factor=other_factor, brightness=brightness,
                posterize_mask=posterize_mask, solarize_from=solarize_from, gray=gray)


# ----------------------------------------------------------------------------------------------------------
# The ops, on uint8 [N, H, W, 3]

def _to_uint8(values) -> jnp.ndarray:
    """torch's ``.clamp(0, 255).to(uint8)``: clamp, then truncate toward zero."""
    return jnp.clip(values, 0.0, 255.0).astype(jnp.uint8)


def _unfused(values) -> jnp.ndarray:
    """``values`` unchanged, behind a select XLA keeps (``x == x`` is not folded without fast-math), so that a
    product computed here is rounded to float32 before it is added: no fused multiply-add across this point
    (``lax.optimization_barrier`` is simplified away before fusion and does not prevent it). No NaN reaches it."""
    return jnp.where(values == values, values, jnp.zeros_like(values))


def _warp(images, theta) -> jnp.ndarray:
    """Nearest-neighbour inverse warp with zero fill, as torchvision's affine grid + grid_sample(nearest,
    padding 'zeros', align_corners=False). ``theta`` is the [3, 2] normalised matrix of ``_normalised_theta``."""
    n, h, w, c = images.shape
    # Output pixel centres relative to the image centre (torch's base grid: -size/2 + 0.5 ... size/2 - 0.5).
    xs = jnp.asarray(np.arange(w, dtype=np.float32) - np.float32((w - 1) / 2))[None, :]
    ys = jnp.asarray(np.arange(h, dtype=np.float32) - np.float32((h - 1) / 2))[:, None]
    grid_x = (xs * theta[0, 0] + ys * theta[1, 0]) + theta[2, 0]
    grid_y = (xs * theta[0, 1] + ys * theta[1, 1]) + theta[2, 1]
    # grid_sample's un-normalisation for align_corners=False, then nearbyint (round half to even).
    src_x = jnp.round((grid_x + 1.0) * np.float32(w / 2) - 0.5)
    src_y = jnp.round((grid_y + 1.0) * np.float32(h / 2) - 0.5)
    inside = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
    flat = (jnp.clip(src_y, 0, h - 1).astype(jnp.int32) * w
            + jnp.clip(src_x, 0, w - 1).astype(jnp.int32)).reshape(-1)
    gathered = jnp.take(images.reshape(n, h * w, c), flat, axis=1).reshape(n, h, w, c)
    return jnp.where(inside[None, :, :, None], gathered, jnp.zeros((), images.dtype))


def _grayscale(images, gray_table) -> jnp.ndarray:
    """rgb_to_grayscale on uint8: (0.2989 r + 0.587 g) + 0.114 b in float32, truncated. [N, H, W, 1] uint8."""
    table = jnp.asarray(gray_table)
    idx = images.astype(jnp.int32)
    luma = (table[0][idx[..., 0]] + table[1][idx[..., 1]]) + table[2][idx[..., 2]]
    return luma.astype(jnp.uint8)[..., None]


def _smoothed(images) -> jnp.ndarray:
    """torchvision's degenerate image for Sharpness: interior pixels = round(3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13),
    border pixels unchanged. Exact in integers: sum/13 is never a half, and torch's float32 convolution error is
    far below the 1/26 margin, so its round() lands on the same integer."""
    x = images.astype(jnp.int32)
    h, w = x.shape[1], x.shape[2]
    window = sum(x[:, i:h - 2 + i, j:w - 2 + j, :] for i in range(3) for j in range(3))
    total = window + 4 * x[:, 1:-1, 1:-1, :]
    interior = (2 * total + 13) // 26  # round(total / 13)
    return x.at[:, 1:-1, 1:-1, :].set(interior).astype(jnp.uint8)


def _autocontrast(images, semantics: str) -> jnp.ndarray:
    """Stretch each channel's [min, max] to [0, 255] in float32 and truncate; flat channels as ``semantics`` says
    (module docstring)."""
    lo = images.min(axis=(1, 2), keepdims=True).astype(jnp.float32)
    hi = images.max(axis=(1, 2), keepdims=True).astype(jnp.float32)
    flat = lo == hi
    if semantics == "0.10":
        flat_image = jnp.any(flat, axis=-1, keepdims=True)  # torch.where(...)[0] picked whole images
        lo = jnp.where(flat_image, 0.0, lo)
        hi = jnp.where(flat_image, 255.0, hi)
        scale = _rdiv_255(hi - lo)
    else:
        scale = jnp.where(flat, 1.0, _rdiv_255(jnp.where(flat, 1.0, hi - lo)))
        lo = jnp.where(flat, 0.0, lo)
    return _to_uint8((images.astype(jnp.float32) - lo) * scale)


def _rdiv_255(spread) -> jnp.ndarray:
    """torch's ``255 / tensor``: Python-scalar-over-tensor division is ``tensor.reciprocal() * 255``, two
    roundings, which moves some stretched pixels one level down compared with a true division."""
    return (jnp.float32(1.0) / spread) * jnp.float32(255.0)


def _equalize(images) -> jnp.ndarray:
    """torchvision's tensor equalize, per image and channel: step = (pixels - count of the top value) // 255;
    v -> (count of pixels below v + step // 2) // step, clamped to 255; unchanged when step is 0."""
    n, h, w, c = images.shape
    channels = jnp.moveaxis(images, 3, 1).reshape(n * c, h * w).astype(jnp.int32)
    hist = jax.vmap(lambda values: jnp.bincount(values, length=256))(channels)
    top_count = jnp.take_along_axis(hist, channels.max(axis=1, keepdims=True), axis=1)[:, 0]
    step = (h * w - top_count) // 255
    below = jnp.cumsum(hist, axis=1) - hist
    lut = jnp.minimum((below + (step // 2)[:, None]) // jnp.maximum(step, 1)[:, None], 255)
    mapped = jnp.take_along_axis(lut, channels, axis=1)
    out = jnp.where((step == 0)[:, None], channels, mapped)
    return jnp.moveaxis(out.reshape(n, c, h, w), 1, 3).astype(jnp.uint8)


@functools.lru_cache(maxsize=None)
def _branches(height: int, width: int, semantics: str):
    """One function ``(images, bin_index, sign_index) -> images`` per entry of OP_NAMES, for lax.switch."""
    t = _tables(height, width, semantics)

    def identity(images, b, s):
        return images

    def geometric(k):
        def op(images, b, s):
            return _warp(images, jnp.asarray(t["theta"])[k, b, s])
        return op

    def brightness(images, b, s):
        return jnp.asarray(t["brightness"])[b, s][images.astype(jnp.int32)]

    def blend_with(images, other_values, b, s):
        keep = jnp.asarray(t["keep"])[b, s][images.astype(jnp.int32)]
        return _to_uint8(keep + other_values)

    def color(images, b, s):
        gray = _grayscale(images, t["gray"])
        return blend_with(images, jnp.asarray(t["other"])[b, s][gray.astype(jnp.int32)], b, s)

    def contrast(images, b, s):
        gray = _grayscale(images, t["gray"]).astype(jnp.int32)
        # The sum of at most 255 * H * W integers is exact in int32; torch's mean is that sum / (H * W).
        mean = gray.sum(axis=(1, 2, 3), keepdims=True).astype(jnp.float32) / jnp.float32(height * width)
        return blend_with(images, _unfused(jnp.asarray(t["other_factor"])[b, s] * mean), b, s)

    def sharpness(images, b, s):
        if height <= 2 or width <= 2:  # torchvision returns such images unchanged
            return images
        smooth = _smoothed(images)
        return blend_with(images, jnp.asarray(t["other"])[b, s][smooth.astype(jnp.int32)], b, s)

    def posterize(images, b, s):
        return images & jnp.asarray(t["posterize_mask"])[b]

    def solarize(images, b, s):
        hit = images.astype(jnp.int32) >= jnp.asarray(t["solarize_from"])[b]
        return jnp.where(hit, 255 - images, images)

    def autocontrast(images, b, s):
        return _autocontrast(images, semantics)

    def equalize(images, b, s):
        return _equalize(images)

    def invert(images, b, s):
        return 255 - images

    by_name = dict(Identity=identity, Brightness=brightness, Color=color, Contrast=contrast, Sharpness=sharpness,
                   Posterize=posterize, Solarize=solarize, AutoContrast=autocontrast, Equalize=equalize,
                   Invert=invert)
    by_name.update({name: geometric(k) for k, name in enumerate(GEOMETRIC_OPS)})
    return tuple(by_name[name] for name in OP_NAMES)


# ----------------------------------------------------------------------------------------------------------
# Public API

def apply_op(images_uint8, op_name: str, magnitude_bin=None, sign=1, *, semantics: str = "0.10") -> jnp.ndarray:
    """Apply one AutoAugment op to a whole batch: uint8 [N, H, W, 3] -> uint8 [N, H, W, 3].

    ``op_name`` is one of OP_NAMES (static). ``magnitude_bin`` (0..9) and ``sign`` (+1 / -1; ignored by
    unsigned ops) may be Python ints or traced int arrays; ops without a magnitude accept None.
    """
    images_uint8 = jnp.asarray(images_uint8)
    height, width = _check_images(images_uint8)
    index = _check_op(op_name)
    bin_index = _bin_index(op_name, magnitude_bin)
    sign_index = _sign_index(sign)
    return _branches(height, width, _check_semantics(semantics))[index](images_uint8, bin_index, sign_index)


@functools.lru_cache(maxsize=None)
def _policy_arrays(policy: str) -> Dict[str, np.ndarray]:
    table = POLICIES[policy]
    ops = np.asarray([[OP_INDEX[op] for op, _, _ in pair] for pair in table], dtype=np.int32)
    probs = np.asarray([[p for _, p, _ in pair] for pair in table], dtype=np.float32)
    bins = np.asarray([[0 if b is None else b for _, _, b in pair] for pair in table], dtype=np.int32)
    return dict(ops=ops, probs=probs, bins=bins)


def sample_subpolicy(key, policy: str = "cifar10") -> Dict[str, jnp.ndarray]:
    """torchvision's ``get_params`` plus the coin tests, traced: one sub-policy index (uniform over the 25),
    two uniform coins (op i runs when coin_i <= its probability) and two fair signs.

    Returns ``index`` int32 [], ``coins`` float32 [2], ``applied`` bool [2], ``signs`` int32 [2] (+1 / -1),
    ``ops`` int32 [2] (indices into OP_NAMES; Identity where the coin said no) and ``bins`` int32 [2].
    """
    arrays = _policy_arrays(_check_policy(policy))
    key_index, key_coins, key_signs = jax.random.split(key, 3)
    index = jax.random.randint(key_index, (), 0, len(arrays["ops"]), dtype=jnp.int32)
    coins = jax.random.uniform(key_coins, (2,), dtype=jnp.float32)
    signs = jnp.where(jax.random.bernoulli(key_signs, 0.5, (2,)), 1, -1).astype(jnp.int32)
    applied = coins <= jnp.asarray(arrays["probs"])[index]
    ops = jnp.where(applied, jnp.asarray(arrays["ops"])[index], IDENTITY)
    return dict(index=index, coins=coins, applied=applied, signs=signs, ops=ops,
                bins=jnp.asarray(arrays["bins"])[index])


def apply_subpolicy(images_uint8, draw: Dict[str, jnp.ndarray], *, semantics: str = "0.10") -> jnp.ndarray:
    """Run the two stages of a drawn sub-policy (see ``sample_subpolicy``) on a whole batch, in order."""
    images = jnp.asarray(images_uint8)
    height, width = _check_images(images)
    branches = _branches(height, width, _check_semantics(semantics))
    for stage in range(2):
        images = jax.lax.switch(draw["ops"][stage], branches, images, draw["bins"][stage],
                                _sign_index(draw["signs"][stage]))
    return images


def autoaugment(key, images_uint8, policy: str = "cifar10", per_sample: bool = False, *,
                semantics: str = "0.10") -> jnp.ndarray:
    """AutoAugment a uint8 batch [N, H, W, 3] -> uint8, jittable with a traced ``key``.

    Default: one sub-policy, with its two coins and signs, for the whole batch, as torchvision draws them for a
    batch tensor (the original's behaviour). ``per_sample=True`` draws them independently for every image.
    ``policy``: 'cifar10' (the original's choice for CIFAR-100) or 'imagenet' (for Tiny ImageNet).
    """
    images_uint8 = jnp.asarray(images_uint8)
    _check_images(images_uint8)
    policy = _check_policy(policy)
    _check_semantics(semantics)
    if not per_sample:
        return apply_subpolicy(images_uint8, sample_subpolicy(key, policy), semantics=semantics)

    def one_image(image_key, image):
        draw = sample_subpolicy(image_key, policy)
        return apply_subpolicy(image[None], draw, semantics=semantics)[0]

    keys = jax.random.split(key, images_uint8.shape[0])
    return jax.vmap(one_image)(keys, images_uint8)

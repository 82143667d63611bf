"""The original's ImageNet transforms on the host, uint8 out (normalisation and the DA schemes stay on device).

train: ``RandomResizedCrop(224)`` (scale 0.08-1, ratio 3/4-4/3, bilinear) + ``RandomHorizontalFlip()``;
test: ``Resize(256)`` + ``CenterCrop(224)`` (bilinear) - dataset/imagenet.py of the original, torchvision's
defaults. Both split into explicit parameters (``random_resized_crop_params``, ``center_crop_box``) and a
deterministic function of them (``resized_crop``, ``resize_shorter``), so that each can be compared with
torchvision's functional transforms on the same image and the same parameters (tests/fixtures/
make_imagenet_transform_fixture.py). The pixels go through PIL exactly as torchvision's PIL path does (crop, then
``Image.resize`` with BILINEAR, which antialiases when shrinking); differences against a fixture written with another
Pillow build are bounded in the test and documented in docs/streamed_data.md.

The parameters are drawn with numpy from a generator seeded by the example (``example_rng``), not from torch's
global stream: the distributions are torchvision's, the draws are not the same numbers, and the draw of an example
does not depend on worker, batch or process layout - what makes mid-epoch resumption and multi-process runs exact.
"""
from __future__ import annotations

import io
import math

import numpy as np

TRAIN_SIZE = 224
RESIZE_SIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode_rgb(data: bytes):
    """A PIL RGB image from encoded bytes, as torchvision's ``pil_loader`` (greyscale and CMYK JPEGs -> RGB).

    An RGB image is returned as decoded: ``convert("RGB")`` of an RGB image is a full copy (8% of the train
    transform's time, bench/NOTES.md), with the same pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of example ``index`` in epoch ``epoch`` of a run seeded ``seed``."""
    return np.random.default_rng((int(seed) & 0xFFFFFFFF, int(epoch), int(index)))


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int, scale=SCALE,
                               ratio=RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` by torchvision's ``RandomResizedCrop.get_params``: up to ten draws of an area share
    (uniform in ``scale``) and a log-uniform aspect ratio, the first that fits placed uniformly; else the central
    crop clamped to ``ratio``. ``round`` is Python's (half to even), as there."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image, top: int, left: int, h: int, w: int, size: int = TRAIN_SIZE) -> np.ndarray:
    """torchvision ``F.resized_crop(image, top, left, h, w, [size, size])`` on a PIL image, as uint8 [size, size, 3]."""
    from PIL import Image

    return np.asarray(image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR))


def resized_shape(height: int, width: int, size: int = RESIZE_SIZE) -> tuple[int, int]:
    """``(h, w)`` of torchvision's ``Resize(size)``: the shorter side becomes ``size``, the longer one
    ``int(size * long / short)`` (truncated, as torchvision)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_box(height: int, width: int, size: int = TRAIN_SIZE) -> tuple[int, int]:
    """``(top, left)`` of torchvision's ``CenterCrop(size)`` (offsets rounded, images at least ``size``)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def train_transform(data: bytes, rng: np.random.Generator, size: int = TRAIN_SIZE) -> np.ndarray:
    """RandomResizedCrop(size) + RandomHorizontalFlip on encoded bytes -> uint8 [size, size, 3] (a flipped image is
    a reversed view: the batch's ``np.stack`` makes the one copy)."""
    image = decode_rgb(data)
    top, left, h, w = random_resized_crop_params(rng, image.height, image.width)
    out = resized_crop(image, top, left, h, w, size)
    return out[:, ::-1] if rng.random() < 0.5 else out


def resize_for(size: int) -> int:
    """The test Resize of a CenterCrop of ``size``: 256 for 224 (the original's), the same 224/256 share of the
    shorter side at any other size (a run at 32 px resizes to 36, not to 256)."""
    return int(size) * RESIZE_SIZE // TRAIN_SIZE


def test_transform(data: bytes, size: int = TRAIN_SIZE, resize: int | None = None) -> np.ndarray:
    """Resize(resize) + CenterCrop(size) on encoded bytes -> uint8 [size, size, 3]; ``resize`` unset:
    ``resize_for(size)``."""
    from PIL import Image

    resize = resize_for(size) if resize is None else int(resize)
    image = decode_rgb(data)
    h, w = resized_shape(image.height, image.width, resize)
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    top, left = center_crop_box(h, w, size)
    return np.asarray(image.crop((left, top, left + size, top + size)))


test_transform.__test__ = False  # not a pytest test, despite the name

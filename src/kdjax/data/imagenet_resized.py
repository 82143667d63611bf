"""Downsampled ImageNet (Chrabaszcz, Loshchilov & Hutter 2017: "A downsampled variant of ImageNet as an alternative
to the CIFAR datasets"), 8, 16, 32 or 64 px: a host ``Dataset`` for the on-device path (32 px: 3.9 GB as uint8,
64 px: 15.7 GB; ``kdjax.data.placement`` states when it fits the devices).

The files are read as the authors distribute them (image-net.org, "Downsampled ImageNet", npz format):
``Imagenet{S}_train_npz.zip`` (64 px: ``Imagenet64_train_part1_npz.zip`` and ``..._part2_npz.zip``) holding
``train_data_batch_1.npz`` .. ``train_data_batch_10.npz``, and ``Imagenet{S}_val_npz.zip`` holding ``val_data.npz``;
the zips, or the folders they extract to (``Imagenet{S}_*/``), go into ``manual_dir``. Each npz holds ``data``
uint8 [N, 3 * S * S] (the red plane, then green, then blue, each row-major) and ``labels`` [N] in 1..1000.

Labels: the authors' 1-based indices minus one, as tensorflow-datasets' ``imagenet_resized/{S}x{S}`` does. Their
class order is the authors' (their ``map_clsloc.txt``), **not** the sorted-wnid order of ``imagenet`` (torchvision's,
and kdjax's ``imagenet``): a teacher trained on one does not read the other's labels.
"""
from __future__ import annotations

import pathlib
import re
import zipfile

import numpy as np

from kdjax.data import archives
from kdjax.data.core import Dataset

SIZES = (8, 16, 32, 64)
NUM_CLASSES = 1000
TRAIN_BATCHES = 10
URL = "https://image-net.org/download-images.php (Downsampled ImageNet, npz format)"
_TRAIN = re.compile(r"(^|/)train_data_batch_(\d+)(\.npz)?$")
_VAL = re.compile(r"(^|/)val_data(\.npz)?$")


def _members(manual_dir: pathlib.Path, size: int) -> dict[str, tuple]:
    """``{"train_<n>" | "val": (opener,)}``: where each npz of the ``size`` px release lies, in a zip or a folder
    named ``Imagenet{size}_*`` inside ``manual_dir``."""
    found = {}
    for source in sorted(manual_dir.glob(f"Imagenet{size}_*")):
        if source.suffix == ".zip":
            with zipfile.ZipFile(source) as z:
                names = z.namelist()
            entries = [(name, (source, name)) for name in names]
        elif source.is_dir():
            entries = [(str(p.relative_to(source)), (p, None)) for p in source.rglob("*") if p.is_file()]
        else:
            continue
        for name, where in entries:
            train, val = _TRAIN.search(name), _VAL.search(name)
            if train:
                found[f"train_{int(train.group(2))}"] = where
            elif val:
                found["val"] = where
    return found


def _read_npz(where, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, S, S, 3], labels int32 [N] in 0..999)`` of one npz (a file, or a member of a zip)."""
    path, member = where
    name = f"{path}:{member}" if member else str(path)
    try:
        if member:
            with zipfile.ZipFile(path) as z, z.open(member) as f:
                npz = np.load(f)
                data, labels = npz["data"], npz["labels"]
        else:
            with np.load(path) as npz:
                data, labels = npz["data"], npz["labels"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{name} is not a readable downsampled-ImageNet npz with data and labels "
                         f"({type(e).__name__}: {e}): download it again from {URL}") from None
    labels = np.asarray(labels).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape != (labels.shape[0], 3 * size * size):
        raise ValueError(f"{name}: data is {data.dtype} {data.shape} for {labels.shape[0]} labels, expected uint8 "
                         f"[N, {3 * size * size}] ({size} px): is it the {size}x{size} release?")
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise ValueError(f"{name}: labels lie in [{labels.min()}, {labels.max()}], expected 1..{NUM_CLASSES}")
    images = data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)  # planar RGB -> NHWC
    return np.ascontiguousarray(images), (labels - 1).astype(np.int32)


def load_imagenet_resized(*, data_dir, manual_dir, image_size=None) -> Dataset:
    """The ``imagenet_resized`` source: the ``image_size`` px release (8, 16, 32 or 64; default 32) from
    ``manual_dir``. Every file must be there before anything is read."""
    del data_dir
    size = 32 if image_size is None else int(image_size)
    if size not in SIZES:
        raise ValueError(f"imagenet_resized comes in {', '.join(map(str, SIZES))} px: set image_size to one of them "
                         f"(got {size})")
    manual_dir = pathlib.Path(manual_dir)
    found = _members(manual_dir, size)
    wanted = [f"train_{n}" for n in range(1, TRAIN_BATCHES + 1)] + ["val"]
    missing = [w for w in wanted if w not in found]
    if missing:
        first = "val_data.npz" if missing[0] == "val" else f"train_data_batch_{missing[0][6:]}.npz"
        raise archives.DataNotFoundError(
            f"imagenet_resized {size}px: {first} is not in {manual_dir} (looked in Imagenet{size}_*.zip and "
            f"Imagenet{size}_*/ folders{f'; {len(missing) - 1} more files missing' if len(missing) > 1 else ''}): put "
            f"the {size}x{size} npz release from {URL} there")
    parts = [_read_npz(found[w], size) for w in wanted[:-1]]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    del parts
    test_images, test_labels = _read_npz(found["val"], size)
    # ImageNet's normalisation, as the streamed ImageNet uses (imported here: kdjax.data.streamed imports kdjax.data)
    from kdjax.data.streamed.prepare import IMAGENET_MEAN, IMAGENET_STD

    return Dataset(name="imagenet_resized", num_classes=NUM_CLASSES, image_size=size, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD,
                   train_images=train_images, train_labels=train_labels, test_images=test_images,
                   test_labels=test_labels)

"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the dataset that needs no download.

1,797 real images (10 classes) scaled from 0..16 to 0..255, resized with bicubic interpolation (32x32 unless another
size is asked for) and replicated to 3 channels. The train/test split is stratified and fixed (seed and fraction
below), so every run on every machine sees the same 80/20 partition; mean/std come from the train split.
"""
from __future__ import annotations

import numpy as np

from kdjax.data.core import Dataset, channel_stats, resize_images

NUM_CLASSES = 10
NATIVE_SIZE = 8
DEFAULT_SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays holding ``round(test_fraction * n_c)`` of each class c in test."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[:int(round(test_fraction * members.size))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(labels.size), test)
    return train, test


def to_rgb_uint8(images_0_16: np.ndarray, size: int) -> np.ndarray:
    """Scale [N, 8, 8] images in 0..16 to 0..255, resize to ``size`` and repeat the grey channel 3 times."""
    scaled = images_0_16.astype(np.float32)[..., None] * (255.0 / 16.0)
    if size == images_0_16.shape[1]:
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    else:
        grey = resize_images(scaled, size)
    return np.repeat(grey, 3, axis=-1)


def load_digits(*, data_dir=None, manual_dir=None, image_size: int | None = None) -> Dataset:
    """The ``digits`` source (data_dir/manual_dir are unused: the data ships inside scikit-learn)."""
    del data_dir, manual_dir
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    size = DEFAULT_SIZE if image_size is None else image_size
    labels = raw.target.astype(np.int32)
    images = to_rgb_uint8(raw.images, size)
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    mean, std = channel_stats(images[train])
    return Dataset(name="digits", num_classes=NUM_CLASSES, image_size=size, mean=mean, std=std,
                   train_images=images[train], train_labels=labels[train],
                   test_images=images[test], test_labels=labels[test])

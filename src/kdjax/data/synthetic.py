"""``synthetic``: uniformly random uint8 images with balanced random labels, for benchmarks and tests."""
from __future__ import annotations

import math

import numpy as np

from kdjax.data.core import Dataset

# Exact moments of a uniform draw from {0, ..., 255}, in [0, 1] pixel units: no pass over the data is needed, which
# matters for benchmark-sized datasets.
UNIFORM_MEAN = 0.5
UNIFORM_STD = math.sqrt((256.0 ** 2 - 1.0) / 12.0) / 255.0


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """``n`` int32 labels, each class appearing floor or ceil of n / num_classes times, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int32)


def load_synthetic(*, data_dir=None, manual_dir=None, image_size: int | None = None, num_classes: int = 10,
                   num_train: int = 1024, num_test: int = 256, seed: int = 0) -> Dataset:
    """The ``synthetic`` source: ``num_train``/``num_test`` random images of ``image_size`` (default 32)."""
    del data_dir, manual_dir
    for field, value, low in (("num_classes", num_classes, 1), ("num_train", num_train, 1),
                              ("num_test", num_test, 0)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"synthetic: {field} must be an int >= {low}, got {value!r}")
    size = 32 if image_size is None else image_size
    rng = np.random.default_rng(seed)
    train_images = rng.integers(0, 256, (num_train, size, size, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (num_test, size, size, 3), dtype=np.uint8)
    return Dataset(name="synthetic", num_classes=int(num_classes), image_size=size,
                   mean=(UNIFORM_MEAN,) * 3, std=(UNIFORM_STD,) * 3,
                   train_images=train_images, train_labels=balanced_labels(rng, num_train, num_classes),
                   test_images=test_images, test_labels=balanced_labels(rng, num_test, num_classes))

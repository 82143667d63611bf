"""SVHN (cropped digits, 32x32) from the official ``train_32x32.mat`` / ``test_32x32.mat``: a host ``Dataset`` for
the on-device path (600 MB as uint8 with ``extra``, 235 MB without; the original uses train and test only).

The files are MATLAB v5 with ``X`` uint8 [32, 32, 3, N] and ``y`` [N, 1] in 1..10, where 10 is the digit 0;
torchvision's ``SVHN`` maps 10 to 0 and so does this reader. Normalisation as the original's dataset/svhn.py:
mean = std = 0.5. (The original's ``SVHNInstance`` reshapes torchvision's [3, 32, 32] arrays to [32, 32, 3] instead
of transposing them, which scrambles the pixels of CRD runs; kdjax reads the images as they are.)
"""
from __future__ import annotations

import pathlib

import numpy as np

from kdjax.data import archives
from kdjax.data.core import Dataset, resize_images

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# md5 values as torchvision's SVHN checks them.
SVHN_FILES = {
    "train": archives.Archive("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", SVHN_URL),
    "test": archives.Archive("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", SVHN_URL),
}
SVHN_MEAN = SVHN_STD = (0.5, 0.5, 0.5)


def read_svhn_mat(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], labels int32 [N] in 0..9)`` of one official .mat file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... on a damaged file
        raise ValueError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}): download it again from "
                         f"{SVHN_URL}") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path} lacks the X or y variable: it is not an SVHN cropped-digits file ({SVHN_URL})")
    images, labels = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3) \
            or images.shape[3] != labels.shape[0]:
        raise ValueError(f"{path}: X is {images.dtype} {images.shape} for {labels.shape[0]} labels, expected uint8 "
                         "[32, 32, 3, N]: it is not an SVHN cropped-digits file")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise ValueError(f"{path}: labels lie in [{labels.min()}, {labels.max()}], expected 1..10")
    labels = np.where(labels == 10, 0, labels).astype(np.int32)
    return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels


def load_svhn(*, data_dir, manual_dir, image_size=None, verify: bool = True) -> Dataset:
    """The ``svhn`` source: both .mat files from ``manual_dir`` (md5-checked unless ``verify=False``)."""
    splits = {}
    for split, archive in SVHN_FILES.items():
        path = pathlib.Path(manual_dir) / archive.filename
        if not path.exists():
            raise archives.DataNotFoundError(f"svhn: {path} does not exist: put {archive.filename} (from "
                                             f"{archive.url}) into {manual_dir} and rerun")
        if verify:
            archives.verify_archive(path, archive)
        splits[split] = read_svhn_mat(path)
    (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
    size = 32 if image_size is None else image_size
    if size != 32:
        train_images, test_images = resize_images(train_images, size), resize_images(test_images, size)
    return Dataset(name="svhn", num_classes=10, image_size=size, mean=SVHN_MEAN, std=SVHN_STD,
                   train_images=train_images, train_labels=train_labels,
                   test_images=test_images, test_labels=test_labels)

"""Readers of the official dataset archives, and their checksums.

The archives are read straight from the compressed file (no extraction to disk). A reader verifies the archive's md5
(streamed in chunks) before it unpickles or decodes anything, so a corrupt or foreign file fails with a clear message
instead of a confusing parse error - and a pickle that is not the official one is never loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib
import pickle
import tarfile
import zipfile
from typing import Iterator

import numpy as np
from kdjax.errors import KdjaxError


# Normalisation statistics in [0, 1] pixel units. CIFAR-100: the original's dataset/cifar100.py; CIFAR-10: the usual
# training-set values (CRD ships no CIFAR-10 loader); Tiny ImageNet: ImageNet's, as the original's tinyimagenet.py.
STATS = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "tiny_imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tiny_imagenet": 200}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "tiny_imagenet": 64}


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official archive: its file name, md5 and where a user gets it."""

    filename: str
    md5: str
    url: str


# md5 values as published with the archives (and as torchvision checks them).
ARCHIVES = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                       "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                        "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "tiny_imagenet": Archive("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
                             "http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
}


class DataNotFoundError(KdjaxError, FileNotFoundError):
    """A dataset is neither prepared nor available as an archive in the manual directory."""


class ChecksumError(KdjaxError, ValueError):
    """An archive's md5 is not the official one."""


def file_md5(path: pathlib.Path) -> str:
    """md5 hex digest of ``path`` (``hashlib.file_digest`` reads it in chunks: archives never sit in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def verify_archive(path: pathlib.Path, archive: Archive) -> None:
    """Raise ChecksumError unless the file at ``path`` has the md5 of ``archive``."""
    actual = file_md5(path)
    if actual != archive.md5:
        raise ChecksumError(f"{path} has md5 {actual}, expected {archive.md5}: it is corrupt or not the official "
                            f"{archive.filename}; replace it with the file from {archive.url}")


def not_prepared_message(name: str, data_dir, manual_dir, archive: Archive) -> str:
    return (f"{name} is not prepared in {data_dir} and cannot be downloaded: put {archive.filename} "
            f"(from {archive.url}) into {manual_dir} and rerun")


# --- CIFAR

@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """Where the python-pickle CIFAR archives keep each split, and the label key inside the pickles."""

    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    label_key: bytes


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                           b"labels"),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels"),
}


def read_cifar(path: pathlib.Path, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": ...}`` from a verified python-version CIFAR archive, in archive order.

    Each pickle holds ``b"data"`` uint8 [N, 3072] (channel planes R, G, B of 32x32, row-major) and the labels.
    """
    archive, layout = ARCHIVES[name], CIFAR_LAYOUTS[name]
    verify_archive(path, archive)
    wanted = {f"{layout.folder}/{m}" for m in layout.train_members + layout.test_members}
    batches = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                # The md5 above pins the file to the official archive, so unpickling it runs no foreign code.
                batches[member.name] = pickle.load(tar.extractfile(member), encoding="bytes")
    missing = sorted(wanted - batches.keys())
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a python-version CIFAR archive")
    splits = {}
    for split, members in (("train", layout.train_members), ("test", layout.test_members)):
        parts = [batches[f"{layout.folder}/{m}"] for m in members]
        data = np.concatenate([np.asarray(p[b"data"], np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p[layout.label_key], np.int64) for p in parts]).astype(np.int32)
        splits[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels)
    return splits


# --- Tiny ImageNet

TINY_IMAGENET_SIZE = 64


def _decode_rgb(data: bytes, what: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        # A few Tiny ImageNet JPEGs are greyscale; every example becomes 3-channel RGB.
        array = np.asarray(image.convert("RGB"), np.uint8)
    if array.shape != (TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE, 3):
        raise ValueError(f"{what} is {array.shape[1]}x{array.shape[0]}, expected "
                         f"{TINY_IMAGENET_SIZE}x{TINY_IMAGENET_SIZE} as in tiny-imagenet-200")
    return array


def _root_prefix(zf: zipfile.ZipFile, path: pathlib.Path) -> str:
    """The folder prefix holding wnids.txt (``tiny-imagenet-200/`` in the official archive)."""
    for member in zf.namelist():
        if member == "wnids.txt" or member.endswith("/wnids.txt"):
            return member[:-len("wnids.txt")]
    raise ValueError(f"{path} has no wnids.txt: it is not tiny-imagenet-200.zip")


def iter_tiny_imagenet(path: pathlib.Path, split: str, verify: bool = True) -> Iterator[tuple[str, np.ndarray, int]]:
    """``(key, image, label)`` of ``split`` from tiny-imagenet-200.zip: train = train/<wnid>/images/*, test = val/.

    Labels index the sorted wnids (the class order of a torchvision ImageFolder over train/). The official val split
    (50 images per class, labels in val/val_annotations.txt) is the test split. Examples come sorted by key.
    """
    if verify:
        verify_archive(path, ARCHIVES["tiny_imagenet"])
    with zipfile.ZipFile(path) as zf:
        root = _root_prefix(zf, path)
        wnids = sorted(zf.read(root + "wnids.txt").decode().split())
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        if split == "train":
            members = []
            for member in zf.namelist():
                parts = member[len(root):].split("/")
                if member.startswith(root) and len(parts) == 4 and parts[0] == "train" and parts[2] == "images" \
                        and parts[3]:
                    if parts[1] not in label_of:
                        raise ValueError(f"{path}: {member} belongs to {parts[1]}, which wnids.txt does not list")
                    members.append((member, label_of[parts[1]]))
        elif split == "test":
            members = []
            for line in zf.read(root + "val/val_annotations.txt").decode().splitlines():
                if not line.strip():
                    continue
                filename, wnid = line.split("\t")[:2]
                if wnid not in label_of:
                    raise ValueError(f"{path}: val_annotations.txt labels {filename} {wnid}, not in wnids.txt")
                members.append((f"{root}val/images/{filename}", label_of[wnid]))
        else:
            raise ValueError(f"unknown split {split!r}: use train or test")
        if not members:
            raise ValueError(f"{path} holds no {split} images: it is not tiny-imagenet-200.zip")
        for member, label in sorted(members):
            yield member[len(root):], _decode_rgb(zf.read(member), member), label

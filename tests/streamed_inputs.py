"""Fabricated ImageNet-format inputs for the streamed-data tests: a few dozen small JPEGs of 5 real ILSVRC classes,
as the official tars (a tar of per-class tars; a flat validation tar named as the official one, so that the real
validation labels apply) and as the ImageFolder tree the original reads."""
import io
import pathlib
import tarfile

import numpy as np
from PIL import Image

from kdjax.data.streamed import inputs

TRAIN_PER_CLASS = 6
VAL_PER_CLASS = 2


def classes(n=5):
    return inputs.imagenet_classes()[:n]


def jpeg(rng, width, height, quality=90) -> bytes:
    # smooth gradients plus noise: compresses like a photo, decodes to distinct pixels
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    pixels = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_images(seed=0, wnids=None):
    """``{"train": {wnid: {filename: bytes}}, "test": {wnid: {filename: bytes}}}``; validation file names are
    official ones whose ground-truth class is one of ``wnids``."""
    rng = np.random.default_rng(seed)
    wnids = tuple(wnids or classes())
    train = {w: {f"{w}_{100 + 7 * i}.JPEG": jpeg(rng, int(rng.integers(24, 48)), int(rng.integers(24, 48)))
                 for i in range(TRAIN_PER_CLASS)} for w in wnids}
    test = {w: {} for w in wnids}
    for n, wnid in enumerate(inputs.validation_wnids(), 1):
        if wnid in test and len(test[wnid]) < VAL_PER_CLASS:
            test[wnid][f"ILSVRC2012_val_{n:08d}.JPEG"] = jpeg(rng, int(rng.integers(24, 48)),
                                                              int(rng.integers(24, 48)))
        if all(len(v) == VAL_PER_CLASS for v in test.values()):
            break
    return {"train": train, "test": test}


def write_tars(folder: pathlib.Path, images, skip_class=None) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / inputs.TRAIN_TAR, "w") as outer:
        for wnid, files in images["train"].items():
            if wnid == skip_class:
                continue
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, data in files.items():
                    _add(inner, name, data)
            _add(outer, f"{wnid}.tar", buf.getvalue())
    with tarfile.open(folder / inputs.VAL_TAR, "w") as val:
        for files in images["test"].values():
            for name, data in files.items():
                _add(val, name, data)
    return folder


def write_image_folder(folder: pathlib.Path, images) -> pathlib.Path:
    for split, sub in (("train", "train"), ("test", "val")):
        for wnid, files in images[split].items():
            (folder / sub / wnid).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / sub / wnid / name).write_bytes(data)
    return folder


def imagefolder_order(images, split):
    """``[(bytes, label)]`` in torchvision ImageFolder order: classes sorted, files sorted by name."""
    wnids = sorted(images[split])
    return [(images[split][w][name], label) for label, w in enumerate(wnids) for name in sorted(images[split][w])]

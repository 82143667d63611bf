"""CIFAR-10/100 and Tiny ImageNet through tensorflow-datasets, without TensorFlow.

TFDS needs TensorFlow to *prepare* a dataset whose images are ``tfds.features.Image`` (PNG encoding), but neither to
prepare one whose images are uint8 ``tfds.features.Tensor`` features stored as array_record, nor to read that back
through ``as_data_source``. The builders below are of the second kind. They read the official archive from the
manual directory (``tfds.download.DownloadConfig(manual_dir=...)``), check its md5 and never touch the network; the
prepared dataset lives in ``<data_dir>/kdjax_<name>/<version>/`` and later loads read only that.

They are registered with TFDS as ``kdjax_cifar10``, ``kdjax_cifar100`` and ``kdjax_tiny_imagenet`` (TFDS's own
``cifar10``/``cifar100`` use Image features and the binary archives, so they need TensorFlow to prepare).
"""
from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import archives
from kdjax.data.archives import NATIVE_SIZE, NUM_CLASSES, STATS  # noqa: F401
from kdjax.data.core import Dataset, resize_images



def _manual_instructions(name: str) -> str:
    archive = archives.ARCHIVES[name]
    return (f"Put {archive.filename} (from {archive.url}) into the manual directory "
            "(default <data_dir>/downloads/manual).")


def _archive_path(dl_manager, name: str) -> pathlib.Path:
    path = pathlib.Path(dl_manager.manual_dir) / archives.ARCHIVES[name].filename
    if not path.exists():
        raise archives.DataNotFoundError(f"{name}: {path} does not exist. {_manual_instructions(name)}")
    return path


class _UInt8ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An image classification builder whose images are uint8 Tensor features (prepares without TensorFlow)."""

    SOURCE = ""  # key into the tables above
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 Tensor images read from the official archive."}

    def _info(self) -> tfds.core.DatasetInfo:
        size = NATIVE_SIZE[self.SOURCE]
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.SOURCE} from {archives.ARCHIVES[self.SOURCE].filename}, images as uint8 tensors.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES[self.SOURCE]),
            }),
            supervised_keys=("image", "label"),
            # Keep the archive's order, so that a prepared dataset lists its examples exactly as the archive does.
            disable_shuffling=True,
            homepage=archives.ARCHIVES[self.SOURCE].url,
        )


class _CifarBuilder(_UInt8ImageBuilder, skip_registration=True):

    def _split_generators(self, dl_manager):
        splits = archives.read_cifar(_archive_path(dl_manager, self.SOURCE), self.SOURCE)
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label)}


class KdjaxCifar10(_CifarBuilder):
    """CIFAR-10 from cifar-10-python.tar.gz."""

    SOURCE = "cifar10"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions("cifar10")


class KdjaxCifar100(_CifarBuilder):
    """CIFAR-100 (fine labels) from cifar-100-python.tar.gz."""

    SOURCE = "cifar100"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions("cifar100")


class KdjaxTinyImagenet(_UInt8ImageBuilder):
    """Tiny ImageNet (200 classes, 64x64) from tiny-imagenet-200.zip; the official val split is the test split."""

    SOURCE = "tiny_imagenet"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _manual_instructions("tiny_imagenet")

    def _split_generators(self, dl_manager):
        path = _archive_path(dl_manager, self.SOURCE)
        archives.verify_archive(path, archives.ARCHIVES[self.SOURCE])
        return {split: self._generate_examples(path, split) for split in ("train", "test")}

    def _generate_examples(self, path, split):
        for key, image, label in archives.iter_tiny_imagenet(path, split, verify=False):
            yield key, {"image": image, "label": label}


BUILDERS = {"cifar10": KdjaxCifar10, "cifar100": KdjaxCifar100, "tiny_imagenet": KdjaxTinyImagenet}


def prepared_builder(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
    """The TFDS builder of ``name``, prepared from the archive in ``manual_dir`` if it was not prepared yet.

    Nothing is downloaded: without a prepared copy and without the archive, the error names the file and the folder.
    """
    builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        archive = archives.ARCHIVES[name]
        if not (manual_dir / archive.filename).exists():
            raise archives.DataNotFoundError(archives.not_prepared_message(name, data_dir, manual_dir, archive))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of ``split`` as (uint8 [N, H, W, 3], int32 [N]), in stored order.

    Records are read one by one: decoding dominates (about 0.3-0.6 ms per record on one CPU core, so 20-40 s for
    CIFAR), and batched ``__getitems__`` is no faster while tfds.testing.mock_data does not support it.
    """
    source = builder.as_data_source(split=split)
    n = len(source)
    size = NATIVE_SIZE[builder.SOURCE]
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        record = source[i]
        images[i] = record["image"]
        labels[i] = record["label"]
    return images, labels


def load_tfds_source(name: str, *, data_dir: pathlib.Path, manual_dir: pathlib.Path,
                     image_size: int | None = None) -> Dataset:
    """The ``cifar10``, ``cifar100`` and ``tiny_imagenet`` sources: prepare if needed, read, resize if asked."""
    builder = prepared_builder(name, data_dir, manual_dir)
    (train_images, train_labels), (test_images, test_labels) = (read_split(builder, s) for s in ("train", "test"))
    size = NATIVE_SIZE[name] if image_size is None else image_size
    if size != NATIVE_SIZE[name]:
        train_images, test_images = resize_images(train_images, size), resize_images(test_images, size)
    mean, std = STATS[name]
    return Dataset(name=name, num_classes=NUM_CLASSES[name], image_size=size, mean=mean, std=std,
                   train_images=train_images, train_labels=train_labels,
                   test_images=test_images, test_labels=test_labels)

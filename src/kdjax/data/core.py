"""The in-memory dataset record, the source registry and ``load``.

A source is a function ``fn(*, data_dir, manual_dir, image_size, **options) -> Dataset``. Every source, built in or
registered by a user, goes through the same checks in ``load`` so that the rest of the library can rely on uint8 NHWC
images, int32 labels in ``[0, num_classes)`` and a 3-tuple mean/std in [0, 1] pixel units.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

import numpy as np

DATA_DIR_ENV = "KDJAX_DATA_DIR"
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in host memory.

    Images are uint8 ``[N, H, W, 3]`` with ``H == W == image_size``; labels are int32 ``[N]``. ``mean`` and ``std``
    are per-channel statistics in [0, 1] pixel units (the values the normalisation of this dataset uses).
    """

    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def images(self, split: str) -> np.ndarray:
        return getattr(self, f"{_check_split(split)}_images")

    def labels(self, split: str) -> np.ndarray:
        return getattr(self, f"{_check_split(split)}_labels")

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_labels.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.train_images, self.train_labels, self.test_images, self.test_labels))


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


SourceFn = Callable[..., Dataset]
_SOURCES: dict[str, SourceFn] = {}


def register_source(name: str, fn: SourceFn, *, overwrite: bool = False) -> None:
    """Make ``load(name, ...)`` call ``fn(*, data_dir, manual_dir, image_size, **options)``.

    ``fn`` returns a ``Dataset``; ``image_size=None`` means the source's native size. Registering a taken name fails
    unless ``overwrite=True``, so that two sources never shadow each other by accident.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a source name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"the source {name!r} must be a callable returning a Dataset, got {type(fn).__name__}")
    if name in _SOURCES and not overwrite:
        raise ValueError(f"a data source named {name!r} is already registered; pass overwrite=True to replace it")
    _SOURCES[name] = fn


def names() -> list[str]:
    """The registered source names, sorted."""
    return sorted(_SOURCES)


def default_data_dir() -> pathlib.Path:
    """``$KDJAX_DATA_DIR`` when set, else ``~/tensorflow_datasets`` (the TFDS default)."""
    return pathlib.Path(os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets").expanduser()


def resolve_dirs(data_dir=None, manual_dir=None) -> tuple[pathlib.Path, pathlib.Path]:
    """``(data_dir, manual_dir)`` with defaults filled in; manual_dir defaults to ``<data_dir>/downloads/manual``."""
    data_dir = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    manual_dir = pathlib.Path(manual_dir).expanduser() if manual_dir is not None else data_dir / "downloads" / "manual"
    return data_dir, manual_dir


def load(name: str, *, data_dir=None, manual_dir=None, image_size: int | None = None, **options) -> Dataset:
    """Load the dataset ``name`` (see ``names()``) into host memory as a checked ``Dataset``.

    ``image_size`` resizes the images to ``image_size x image_size`` (None keeps the source's own size); ``options``
    go to the source (for example ``num_classes`` of ``synthetic``).
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown dataset {name!r}: valid names are {', '.join(names())}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    data_dir, manual_dir = resolve_dirs(data_dir, manual_dir)
    dataset = _SOURCES[name](data_dir=data_dir, manual_dir=manual_dir,
                             image_size=None if image_size is None else int(image_size), **options)
    validate(dataset, source=name)
    if image_size is not None and dataset.image_size != image_size:
        raise ValueError(f"the source {name!r} returned {dataset.image_size}px images for image_size={image_size}; "
                         "it must resize to the size asked for")
    return dataset


def config_options(config) -> dict:
    """The ``load`` arguments a run config sets: data_dir, manual_dir, image_size and the set fields of its
    ``dataset_options`` group."""
    options = {k: config[k] for k in ("data_dir", "manual_dir", "image_size") if config.get(k) is not None}
    group = config.get("dataset_options")
    options.update({k: v for k, v in (group.items() if group is not None else ()) if v is not None})
    return options


def load_for(config) -> Dataset:
    """The dataset a run config names (``config.dataset``), with its options."""
    return load(config.dataset, **config_options(config))


def validate(dataset: Dataset, *, source: str = "") -> None:
    """Raise a clear error when ``dataset`` breaks the Dataset contract (dtypes, shapes, label range, stats)."""
    where = f"the source {source!r}" if source else "the dataset"
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{where} must return a kdjax.data.Dataset, got {type(dataset).__name__}")
    size = dataset.image_size
    for split in SPLITS:
        images, labels = dataset.images(split), dataset.labels(split)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise TypeError(f"{where}: {split}_images must be a uint8 numpy array, got "
                            f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"{where}: {split}_images must have shape [N, {size}, {size}, 3], got {images.shape}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise TypeError(f"{where}: {split}_labels must be an int32 numpy array of shape [{images.shape[0]}], got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
        if labels.size and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise ValueError(f"{where}: {split}_labels must lie in [0, {dataset.num_classes}), "
                             f"got [{labels.min()}, {labels.max()}]")
    for field in ("mean", "std"):
        value = getattr(dataset, field)
        if len(value) != 3 or not all(0.0 <= float(v) <= 1.0 for v in value):
            raise ValueError(f"{where}: {field} must be 3 floats in [0, 1] pixel units, got {value!r}")
    if not all(float(v) > 0 for v in dataset.std):
        raise ValueError(f"{where}: std must be positive, got {dataset.std!r}")


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 NHWC images, in [0, 1] pixel units.

    Sums run in float64 over chunks, so that large datasets neither lose precision nor need a float copy at once.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot compute mean/std of an empty split")
    total = np.zeros(images.shape[-1], np.float64)
    total_sq = np.zeros(images.shape[-1], np.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += np.square(block).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize NHWC images with values in 0..255 (any numeric dtype) to uint8 ``[N, size, size, C]``, bicubic.

    PIL's resampling filters widen with the size ratio, so shrinking is antialiased and growing is smooth. Each
    channel goes through a float32 image, so nothing is rounded before the final uint8 conversion; the bicubic
    overshoot is clipped to 0..255.
    """
    from PIL import Image

    out = np.empty((images.shape[0], size, size, images.shape[-1]), np.uint8)
    for i, image in enumerate(images):
        for c in range(images.shape[-1]):
            plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
            resized = np.asarray(plane.resize((size, size), Image.Resampling.BICUBIC))
            out[i, ..., c] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return out

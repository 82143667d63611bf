"""Data sources and their placement in accelerator memory.

``load(name, ...)`` returns a host ``Dataset`` (uint8 NHWC images, int32 labels, mean/std); ``DeviceDataset`` puts it
on the devices of a ("data",) mesh and gathers batches inside jit. Built-in sources: ``cifar10``, ``cifar100``,
``tiny_imagenet`` (through tensorflow-datasets, prepared from the official archives), ``svhn`` (the official .mat
files), ``imagenet_resized`` (the downsampled-ImageNet npz files, 8-64 px), ``digits`` (bundled with scikit-learn,
no download) and ``synthetic``; ``register_source`` adds more.
ImageNet and ImageNet-100 do not fit in memory: ``kdjax.data.streamed`` prepares and streams them; ``open_for`` /
``place`` pick the streamed or the in-memory path from a run config.
"""
from kdjax.data.archives import ChecksumError, DataNotFoundError
from kdjax.data.core import (Dataset, channel_stats, config_options, default_data_dir, load, load_for, names,
                             register_source, resize_images)
from kdjax.data.device import DeviceDataset
from kdjax.data.placement import is_streamed, open_for, place, streams
from kdjax.data.digits import load_digits
from kdjax.data.svhn import load_svhn
from kdjax.data.imagenet_resized import load_imagenet_resized
from kdjax.data.synthetic import load_synthetic


def _tfds_source(name: str):
    # tensorflow_datasets is imported on first use only, so that `import kdjax.data` stays light.
    def load_from_tfds(*, data_dir, manual_dir, image_size=None):
        from kdjax.data.tfds_sources import load_tfds_source

        return load_tfds_source(name, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size)

    load_from_tfds.__name__ = f"load_{name}"
    return load_from_tfds


register_source("digits", load_digits)
register_source("synthetic", load_synthetic)
register_source("svhn", load_svhn)
register_source("imagenet_resized", load_imagenet_resized)
for _name in ("cifar10", "cifar100", "tiny_imagenet"):
    register_source(_name, _tfds_source(_name))

__all__ = ["ChecksumError", "DataNotFoundError", "Dataset", "DeviceDataset", "channel_stats", "config_options",
           "default_data_dir", "is_streamed", "load", "load_for", "names", "open_for", "place", "register_source",
           "resize_images", "streams"]

"""Where a run's data comes from: a dataset too large for memory (ImageNet, ImageNet-100) is streamed from its
prepared records (``kdjax.data.streamed``), every other source is loaded into host memory and placed on the
devices (``kdjax.data.DeviceDataset``). The training loop and the evaluator tell the two apart by ``placement``."""
from kdjax.data import core
from kdjax.data.device import DeviceDataset

STREAMED = "streamed"


def is_streamed(dataset) -> bool:
    """True for a ``StreamedDataset``: its host pipeline already did RandomResizedCrop + flip, and its batches come
    from a host iterator instead of an on-device gather."""
    return getattr(dataset, "placement", None) == STREAMED


def streams(dataset_name) -> bool:
    """True for the datasets that `kdjax prepare_data` prepares (imported here, not at the top: kdjax.data.streamed
    imports kdjax.data)."""
    from kdjax.data.streamed.prepare import DATASETS

    return dataset_name in DATASETS


def open_for(config):
    """The dataset a run config names: ImageNet / ImageNet-100 opened for streaming from the records under
    ``data_dir`` (shard digests verified; ``image_size`` unset: 224), any other source ``core.load_for(config)``."""
    if not streams(config.dataset):
        return core.load_for(config)
    from kdjax.data.streamed import StreamedDataset, dataset_root
    from kdjax.data.streamed.transforms import TRAIN_SIZE

    data_dir, _ = core.resolve_dirs(config.get("data_dir"), config.get("manual_dir"))
    size = config.get("image_size")
    return StreamedDataset.open(dataset_root(data_dir, config.dataset), image_size=TRAIN_SIZE if size is None
                                else int(size))


def place(dataset, mesh):
    """What ``loop.fit`` and the evaluator consume: a streamed dataset as it is, a host dataset on the mesh."""
    return dataset if is_streamed(dataset) else DeviceDataset.create(dataset, mesh)

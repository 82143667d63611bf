"""Where a run's data comes from (docs/data.md, "Placement"): a dataset too large for memory (ImageNet,
ImageNet-100) is streamed from its prepared records (``kdjax.data.streamed``), every other source is loaded into
host memory and placed on the devices (``kdjax.data.DeviceDataset``). The training loop and the evaluator tell the
two apart by ``placement``.

The run's ``placement`` field: ``device``, ``streamed`` or unset (auto). Auto picks by what the dataset is: the
record datasets stream (their JPEGs are decoded and cropped per step from the full-resolution image; 150 GB do not
fit any device), the array datasets go to the devices, replicated when they take at most half of the smallest free
device memory, else sharded over the devices (``DeviceDataset``). An array dataset whose per-device shard would
still exceed that budget is refused in one line with the figures, before compiling, rather than failing with an
out-of-memory error. The two combinations that have no implementation (records on the device, arrays streamed) are
refused in one line before anything is loaded.
"""
from kdjax.data import core
from kdjax.data.device import DEFAULT_MAX_FRACTION, DeviceDataset, _mib, min_free_bytes

STREAMED = "streamed"
DEVICE = "device"
PLACEMENTS = (DEVICE, STREAMED)


def is_streamed(dataset) -> bool:
    """True for a ``StreamedDataset``: its host pipeline already did RandomResizedCrop + flip, and its batches come
    from a host iterator instead of an on-device gather."""
    return getattr(dataset, "placement", None) == STREAMED


def streams(dataset_name) -> bool:
    """True for the datasets that `kdjax prepare_data` prepares (imported here, not at the top: kdjax.data.streamed
    imports kdjax.data)."""
    from kdjax.data.streamed.prepare import DATASETS

    return dataset_name in DATASETS


def check_placement(config) -> str:
    """The placement of the run ``config`` (``device`` or ``streamed``), or a ValueError naming the fix; reads the
    config only (before any loading)."""
    asked = config.get("placement")
    if asked not in (None, "auto") + PLACEMENTS:
        raise ValueError(f"placement must be auto, {DEVICE} or {STREAMED}, not {asked!r}")
    natural = STREAMED if streams(config.dataset) else DEVICE
    if asked in (None, "auto") or asked == natural:
        return natural
    if natural == STREAMED:
        raise ValueError(f"placement={DEVICE}: {config.dataset} is read from prepared JPEG records and cropped from "
                         f"the full image every step, which only the streamed path does; unset placement, or use "
                         f"dataset=imagenet_resized (8-64 px arrays) for an ImageNet held in device memory")
    raise ValueError(f"placement={STREAMED}: only the prepared record datasets (imagenet, imagenet100) stream; "
                     f"{config.dataset} is loaded into memory and placed on the devices: unset placement")


def open_for(config):
    """The dataset a run config names: ImageNet / ImageNet-100 opened for streaming from the records under
    ``data_dir`` (shard digests verified: ``verify``; ``image_size`` unset: 224), any other source
    ``core.load_for(config)``."""
    if check_placement(config) == DEVICE:
        return core.load_for(config)
    from kdjax.data.streamed import StreamedDataset, dataset_root
    from kdjax.data.streamed.records import VERIFY_MODES
    from kdjax.data.streamed.transforms import TRAIN_SIZE

    verify = config.get("verify") or VERIFY_MODES[0]
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    data_dir, _ = core.resolve_dirs(config.get("data_dir"), config.get("manual_dir"))
    size = config.get("image_size")
    return StreamedDataset.open(dataset_root(data_dir, config.dataset), image_size=TRAIN_SIZE if size is None
                                else int(size), verify=verify)


def check_fits(nbytes: int, num_devices: int, free_bytes, name: str = "the dataset",
               max_fraction: float = DEFAULT_MAX_FRACTION) -> None:
    """Refuse an array dataset whose 1/``num_devices`` shard exceeds ``max_fraction`` of the smallest free device
    memory (``free_bytes`` None: the devices report nothing, assumed to fit)."""
    if free_bytes is None:
        return
    shard = -(-int(nbytes) // int(num_devices))
    if shard > max_fraction * free_bytes:
        raise ValueError(f"{name} takes {_mib(nbytes)}, {_mib(shard)} per device over {num_devices} device(s): more "
                         f"than {max_fraction:.0%} of the {_mib(free_bytes)} free per device; use more devices, a "
                         f"smaller image_size, or a streamed dataset (imagenet, imagenet100)")


def place(dataset, mesh):
    """What ``loop.fit`` and the evaluator consume: a streamed dataset as it is, a host dataset on the mesh
    (``check_fits`` first)."""
    if is_streamed(dataset):
        return dataset
    check_fits(dataset.nbytes, mesh.size, min_free_bytes(mesh), dataset.name)
    return DeviceDataset.create(dataset, mesh)

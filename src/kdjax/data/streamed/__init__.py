"""Datasets too large for device memory (ImageNet, ImageNet-100): prepared once into ArrayRecord shards, then
streamed through grain pipelines that decode and augment on the host. See docs/streamed_data.md.

    prepare_dataset(name, manual_dir, data_dir)       -> Manifest   (python -m kdjax.data.streamed)
    StreamedDataset.open(dataset_root(data_dir, name)) -> StreamedDataset
    .train_steps(plan, num_epochs, seed) / .eval_steps(batch_size) -> grain MapDataset of per-step batch dicts
    host_iterator(steps, start=...)                    -> grain iterator (get_state / set_state)
    DeviceIterator(host, mesh) / to_global(batch, mesh) -> global jax.Arrays on a ("data",) mesh
"""
from kdjax.data.streamed.inputs import IMAGENET100_CLASSES, InputError
from kdjax.data.streamed.prepare import dataset_root, prepare_dataset
from kdjax.data.streamed.records import CorruptShardError, Manifest, NotPreparedError, open_manifest
from kdjax.data.streamed.source import (DeviceIterator, ProcessShare, StreamedDataset, epoch_order, host_iterator,
                                        to_global)

__all__ = ["CorruptShardError", "DeviceIterator", "IMAGENET100_CLASSES", "InputError", "Manifest",
           "NotPreparedError", "ProcessShare", "StreamedDataset", "dataset_root", "epoch_order", "host_iterator",
           "open_manifest", "prepare_dataset", "to_global"]

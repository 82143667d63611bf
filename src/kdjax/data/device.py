"""``DeviceDataset``: a Dataset resident in accelerator memory, and batch gathering inside jit.

Placement. The whole dataset is replicated on every device of the ("data",) mesh when it fits (CIFAR is 150 MB,
Tiny ImageNet 1.2 GB): a step then gathers its part of the global batch from local memory with no communication.
Only when it does not fit are the examples sharded over "data" (each device holds a contiguous 1/n of the rows,
zero-padded to a multiple of n). The choice is logged.

Gathering from the sharded layout (``_sharded_take``) costs, per call: an all-gather of the global index vector
(B int32, negligible) and a reduce-scatter of the B gathered rows, i.e. about B x image bytes moved per device
(B = 64 CIFAR images = 192 KiB), plus a local gather of B rows. No device ever materialises more than its own shard,
which is the point of this layout; replicated gathering moves nothing.

Pass the DeviceDataset as an argument of the jitted function (it is a pytree whose leaves are the four arrays):
closing over it would bake the arrays into the compiled program as constants.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.data.core import SPLITS, Dataset, _check_split
from kdjax.parallel import DATA_AXIS, make_mesh, wait_for_all_processes

PLACEMENTS = ("auto", "replicated", "sharded")
# Share of a device's free memory that the replicated dataset may take: the rest is for the model, optimizer state
# and activations of the training step.
DEFAULT_MAX_FRACTION = 0.5


def _static(**kwargs):
    return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class DeviceDataset:
    """The four arrays of a Dataset on a ("data",) mesh, replicated (``placement == "replicated"``) or sharded.

    In the sharded layout the leading dimension is padded with zero rows to a multiple of the mesh size; the
    ``num_train``/``num_test`` fields give the real example counts.
    """

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array
    mesh: jax.sharding.Mesh = _static()
    placement: str = _static()
    num_train: int = _static()
    num_test: int = _static()
    name: str = _static()
    num_classes: int = _static()
    image_size: int = _static()
    mean: tuple[float, float, float] = _static()
    std: tuple[float, float, float] = _static()

    @classmethod
    def create(cls, dataset: Dataset, mesh: jax.sharding.Mesh | None = None, *, placement: str = "auto",
               max_fraction: float = DEFAULT_MAX_FRACTION) -> "DeviceDataset":
        """Put ``dataset`` on ``mesh`` (1-D, axis "data"; default ``kdjax.parallel.make_mesh()`` over all devices).

        ``placement``: "auto" replicates when the dataset takes at most ``max_fraction`` of the smallest free device
        memory (``device.memory_stats()``; devices that report nothing are assumed to have room), else shards;
        "replicated" and "sharded" force a layout (tests, benchmarks).
        """
        mesh = make_mesh() if mesh is None else mesh
        if tuple(mesh.axis_names) != (DATA_AXIS,):
            raise ValueError(f"DeviceDataset needs a 1-D mesh with the axis {DATA_AXIS!r}, got axes "
                             f"{tuple(mesh.axis_names)}; build one with kdjax.parallel.make_mesh()")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
        free = min_free_bytes(mesh)
        chosen, reason = choose_placement(dataset.nbytes, free, placement, max_fraction)
        num_devices = mesh.devices.size
        if chosen == "replicated":
            sharding = NamedSharding(mesh, P())
            per_device = dataset.nbytes
        else:
            sharding = NamedSharding(mesh, P(DATA_AXIS))
            per_device = sum(_shard_nbytes(a, num_devices) for s in SPLITS
                             for a in (dataset.images(s), dataset.labels(s)))
        logging.info("%s on %d device(s): %s (%s per device; %s)", dataset.name, num_devices, chosen,
                     _mib(per_device), reason)
        arrays = {}
        for split in SPLITS:
            for kind, host in (("images", dataset.images(split)), ("labels", dataset.labels(split))):
                if chosen == "sharded":
                    host = _pad_rows(host, num_devices)
                arrays[f"{split}_{kind}"] = _place(host, sharding)
        return cls(**arrays, mesh=mesh, placement=chosen, num_train=dataset.num_train, num_test=dataset.num_test,
                   name=dataset.name, num_classes=dataset.num_classes, image_size=dataset.image_size,
                   mean=tuple(dataset.mean), std=tuple(dataset.std))

    def images(self, split: str) -> jax.Array:
        return getattr(self, f"{_check_split(split)}_images")

    def labels(self, split: str) -> jax.Array:
        return getattr(self, f"{_check_split(split)}_labels")

    def gather(self, split: str, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(images[indices], labels[indices])`` of ``split``, both sharded P("data") along the batch.

        ``indices``: int [B] global example indices in ``[0, num_train)`` (or ``num_test``), B a multiple of the mesh size,
        best already sharded P("data"). Works inside jit (pass ``self`` as an argument) and eagerly. Indices out of
        range give zero images with label 0.
        """
        if indices.ndim != 1:
            raise ValueError(f"gather takes a 1-D index vector, got shape {indices.shape}")
        num_devices = self.mesh.devices.size
        if indices.shape[0] % num_devices:
            raise ValueError(f"the global batch ({indices.shape[0]}) must be a multiple of the {num_devices} devices "
                             "of the mesh; change the batch size")
        take = _replicated_take if self.placement == "replicated" else _sharded_take
        array_spec = P() if self.placement == "replicated" else P(DATA_AXIS)
        gather_fn = jax.shard_map(take, mesh=self.mesh, in_specs=(array_spec, array_spec, P(DATA_AXIS)),
                                  out_specs=(P(DATA_AXIS), P(DATA_AXIS)))
        return gather_fn(self.images(split), self.labels(split), indices.astype(jnp.int32))


def _replicated_take(images, labels, indices):
    """Per device: rows of the full local copy for this device's part of the batch (no communication)."""
    return (jnp.take(images, indices, axis=0, mode="fill", fill_value=0),
            jnp.take(labels, indices, axis=0, mode="fill", fill_value=0))


def _sharded_take(images_shard, labels_shard, local_indices):
    """Per device: each device contributes the requested rows it owns; a reduce-scatter hands out the batch.

    Every global index is owned by exactly one shard (zero rows elsewhere), so the sum in the reduce-scatter is
    exact even on uint8.
    """
    global_indices = jax.lax.all_gather(local_indices, DATA_AXIS, tiled=True)
    rows = images_shard.shape[0]
    offsets = global_indices - jax.lax.axis_index(DATA_AXIS) * rows
    owned = (offsets >= 0) & (offsets < rows)
    safe = jnp.where(owned, offsets, 0)
    images = jnp.where(owned[:, None, None, None], jnp.take(images_shard, safe, axis=0), jnp.zeros((), jnp.uint8))
    labels = jnp.where(owned, jnp.take(labels_shard, safe, axis=0), 0)
    return (jax.lax.psum_scatter(images, DATA_AXIS, scatter_dimension=0, tiled=True),
            jax.lax.psum_scatter(labels, DATA_AXIS, scatter_dimension=0, tiled=True))


def min_free_bytes(mesh: jax.sharding.Mesh) -> int | None:
    """Smallest ``bytes_limit - bytes_in_use`` over the devices of ``mesh``; None when no device reports it.

    With several processes the minimum is taken over all of them, so that every process picks the same layout.
    """
    free = []
    for device in mesh.devices.flat:
        if device.process_index != jax.process_index():
            continue
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "bytes_limit" in stats:
            free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    local = min(free) if free else -1  # -1: unknown
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        wait_for_all_processes("free_bytes")  # the first collective of a run: see its docstring
        known = [int(v) for v in np.ravel(multihost_utils.process_allgather(np.int64(local))) if v >= 0]
        return min(known) if known else None
    return None if local < 0 else local


def choose_placement(nbytes: int, free_bytes: int | None, placement: str,
                     max_fraction: float = DEFAULT_MAX_FRACTION) -> tuple[str, str]:
    """``(layout, reason)`` for a dataset of ``nbytes`` given the smallest free device memory (None = unknown)."""
    if placement != "auto":
        return placement, f"{placement} layout requested"
    if free_bytes is None:
        return "replicated", "the devices report no memory statistics; assuming it fits"
    budget = int(max_fraction * free_bytes)
    if nbytes <= budget:
        return "replicated", f"fits in {max_fraction:.0%} of the {_mib(free_bytes)} free per device"
    return "sharded", f"{_mib(nbytes)} exceeds {max_fraction:.0%} of the {_mib(free_bytes)} free per device"


def _shard_nbytes(array: np.ndarray, num_devices: int) -> int:
    """Bytes of one device's shard of ``array`` once padded to a multiple of ``num_devices`` rows."""
    return -(-array.shape[0] // num_devices) * (array.nbytes // max(array.shape[0], 1))


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    missing = -array.shape[0] % multiple
    if not missing:
        return array
    return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


def _place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # From a callback rather than device_put: each process supplies only the blocks of its own devices, which also
    # works when the mesh spans several hosts.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _mib(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"

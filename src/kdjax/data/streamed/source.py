"""The streamed source: grain pipelines over a prepared dataset's ArrayRecord shards, one element per step.

Element ``s`` of the training pipeline is this process's part of global step ``s``:

* epoch ``e, k = divmod(s, steps_per_epoch)`` of the ``kdjax.data.epochs`` plan (full batches, then the short one
  under the ``'keep'`` rule), in the order of a permutation drawn from ``(seed, e)``;
* the global batch is rows ``[k * B, k * B + rows)`` of that order; process ``p`` of ``P`` takes the p-th of ``P``
  equal consecutive slices, so that ``jax.make_array_from_process_local_data`` over a ("data",) mesh reassembles the
  global batch in order (``to_global``);
* each example is decoded and augmented (``transforms.train_transform``) with randomness drawn from
  ``(seed, e, example index)``.

Every element is thus a pure function of its step, which is why grain's iterator state (the next step: ``{"next_index":
s}``, ``get_state``/``set_state``) is all that must be checkpointed to resume mid-epoch exactly, and why a run on P
processes feeds the devices the same global batches as a run on one. The batch dict is what the training step takes:
``{"images": uint8 [b, 224, 224, 3], "labels": int32 [b], "indices": int32 [b]}`` (``indices``: example index in
the split, for CRD's memory banks). Evaluation batches add ``"mask"`` (bool [b]): the last batch is padded to the
full size, padding rows are masked, and over all processes every test image appears exactly once.

Parallelism: grain's read threads (``threads``: PIL decodes and resizes with the GIL released) or worker processes
(``workers``, ``mp_prefetch``); ``device_iterator`` keeps ``buffer`` global batches in flight on the devices while
the previous step runs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from kdjax.data import epochs as epochs_lib
from kdjax.data.streamed import records, transforms


@dataclasses.dataclass(frozen=True)
class ProcessShare:
    """Which part of every global batch this process reads: slice ``index`` of ``count``."""
    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> "ProcessShare":
        import jax

        return cls(jax.process_index(), jax.process_count())

    def rows(self, global_rows: int) -> slice:
        if global_rows % self.count:
            raise ValueError(f"a batch of {global_rows} rows does not divide over {self.count} processes: use a "
                             f"batch size that is a multiple of the device count")
        per = global_rows // self.count
        return slice(self.index * per, (self.index + 1) * per)


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of epoch ``epoch``: a permutation drawn from ``(seed, epoch)`` only."""
    return np.random.default_rng((int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED)).permutation(num_examples)


class _RecordReader:
    """Opens the shards lazily, so that the pipeline pickles cheaply into grain's worker processes."""

    def __init__(self, paths):
        self.paths, self._source = [str(p) for p in paths], None

    def read(self, indices: np.ndarray) -> list[tuple[bytes, int, int]]:
        if not len(indices):  # a process's share of a padded evaluation batch can be all padding
            return []
        if self._source is None:  # first read in this process (grain's worker processes included)
            import grain

            pin_malloc_mmap_threshold()

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return [records.decode_record(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def __getstate__(self):
        return {"paths": self.paths, "_source": None}


def _stack(examples: list[tuple[bytes, int, int]], expected: np.ndarray, make_image, size: int) -> dict:
    indices = np.array([index for _, _, index in examples], np.int32)
    if not np.array_equal(indices, expected):  # a shard swapped or reordered since the manifest was written
        raise records.CorruptShardError(f"records hold examples {indices[:4].tolist()}... where "
                                        f"{expected[:4].tolist()}... were asked for: prepare the dataset again")
    images = [make_image(data, index) for data, _, index in examples]
    return {"images": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "labels": np.array([label for _, label, _ in examples], np.int32), "indices": indices}


def _pad_rows(batch: dict, missing: int, size: int) -> dict:
    """``missing`` padding rows appended (zero images, label 0, index -1) and the ``mask`` of the real rows."""
    if missing:
        batch = {"images": np.concatenate([batch["images"], np.zeros((missing, size, size, 3), np.uint8)]),
                 "labels": np.concatenate([batch["labels"], np.zeros(missing, np.int32)]),
                 "indices": np.concatenate([batch["indices"], np.full(missing, -1, np.int32)])}
    return {**batch, "mask": batch["indices"] >= 0}


class TrainBatch:
    """``step -> this process's part of the global batch of that step`` (module docstring).

    ``pad_to`` (the T. stddev evaluator: the device count) pads every global batch with masked rows to a multiple
    of it, so that a short last batch of any size still divides over the processes and devices; the padding goes to
    the end of the global batch and the batch dict gains ``"mask"``. None (training): batches as they are."""

    def __init__(self, paths, plan: epochs_lib.EpochPlan, seed: int, share: ProcessShare, image_size: int,
                 pad_to: Optional[int] = None):
        self.reader, self.plan, self.seed, self.share, self.image_size = (_RecordReader(paths), plan, int(seed),
                                                                          share, image_size)
        self.pad_to = pad_to
        self._order = (None, None)  # (epoch, permutation): one epoch's order is reused by all its steps

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, self.plan.num_train))
        return self._order[1]

    def global_indices(self, step: int) -> tuple[int, np.ndarray]:
        """``(epoch, example indices of the global batch of step)``."""
        epoch, k = divmod(int(step), self.plan.steps_per_epoch)
        rows = self.plan.batch_size if k < self.plan.full_steps else self.plan.short_batch
        start = k * self.plan.batch_size
        return epoch, self.order(epoch)[start:start + rows]

    def __call__(self, step: int) -> dict:
        epoch, batch = self.global_indices(step)
        if self.pad_to is not None:
            batch = np.concatenate([batch, np.full(-batch.shape[0] % self.pad_to, -1, batch.dtype)])
        rows = batch[self.share.rows(batch.shape[0])]
        local = rows[rows >= 0]
        size = self.image_size
        out = _stack(self.reader.read(local), local,
                     lambda data, index: transforms.train_transform(
                         data, transforms.example_rng(self.seed, epoch, index), size), size)
        return out if self.pad_to is None else _pad_rows(out, rows.shape[0] - local.shape[0], size)


class EvalBatch:
    """``b -> this process's part of evaluation batch b``: rows ``[b*B, (b+1)*B)``, padded and masked at the end."""

    def __init__(self, paths, num_examples: int, batch_size: int, share: ProcessShare, image_size: int):
        self.reader, self.num_examples, self.batch_size, self.share, self.image_size = (
            _RecordReader(paths), num_examples, batch_size, share, image_size)
        share.rows(batch_size)  # fails early when the batch does not divide over the processes

    def __call__(self, b: int) -> dict:
        rows = np.arange(b * self.batch_size, (b + 1) * self.batch_size)[self.share.rows(self.batch_size)]
        real = rows[rows < self.num_examples]
        size = self.image_size
        batch = _stack(self.reader.read(real), real, lambda data, _: transforms.test_transform(data, size), size)
        return _pad_rows(batch, rows.shape[0] - real.shape[0], size)


def pin_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Keep glibc from raising its mmap threshold (``mallopt(M_MMAP_THRESHOLD)``); True when applied.

    By default glibc raises the threshold to the size of each freed mmap'd block (up to 32 MiB): after the first
    decoded image (500x375x3 = 560 KB) is freed, image buffers and 110 KB record bytes all come from the heap, whose
    fragmentation then grows the RSS step after step (measured: +190 MiB over 300 steps of 64 images, still
    climbing; flat at 222 MiB with the threshold pinned). Pinning it makes large buffers go back to the OS when freed.
    The same as ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment; a no-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(nbytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
    """A prepared dataset opened for streaming: the fields the training code reads off a ``DeviceDataset``
    (name, num_classes, image_size, mean, std, num_train, num_test) and the pipelines over its shards."""
    manifest: records.Manifest
    image_size: int = transforms.TRAIN_SIZE
    placement: str = "streamed"

    @classmethod
    def open(cls, root, *, verify: bool | str = True, image_size: int = transforms.TRAIN_SIZE) -> "StreamedDataset":
        """The prepared dataset in ``root`` (``prepare.dataset_root(data_dir, name)``); ``verify`` checks the
        shards' SHA-256 against the manifest first (a corrupt shard is refused, naming it): ``'changed'`` (True)
        re-hashes only shards changed since their last match, ``'always'`` all of them (``records.verify_shards``).
        Pins glibc's mmap threshold (``pin_malloc_mmap_threshold``) so that host memory stays flat over the epochs."""
        pin_malloc_mmap_threshold()
        return cls(records.open_manifest(root, verify=verify), image_size)

    name = property(lambda self: self.manifest.name)
    num_classes = property(lambda self: self.manifest.num_classes)
    mean = property(lambda self: self.manifest.mean)
    std = property(lambda self: self.manifest.std)
    num_train = property(lambda self: self.manifest.count("train"))
    num_test = property(lambda self: self.manifest.count("test"))

    @property
    def train_labels(self) -> np.ndarray:
        """int32 [num_train] in example-index order, from the manifest (CRD's class tables; its memory banks are
        indexed by the ``indices`` every batch carries)."""
        return self.manifest.labels("train")

    def train_steps(self, plan: epochs_lib.EpochPlan, num_epochs: int, seed: int,
                    share: Optional[ProcessShare] = None, pad_to: Optional[int] = None):
        """The grain ``MapDataset`` of training steps ``0 .. num_epochs * plan.steps_per_epoch - 1`` (``pad_to``:
        ``TrainBatch``)."""
        import grain

        if plan.num_train != self.num_train:
            raise ValueError(f"the plan is for {plan.num_train} examples, the dataset has {self.num_train}")
        share = share or ProcessShare.current()
        fn = TrainBatch(self.manifest.paths("train"), plan, seed, share, self.image_size, pad_to)
        return grain.MapDataset.range(num_epochs * plan.steps_per_epoch).map(fn)

    def eval_steps(self, batch_size: int, share: Optional[ProcessShare] = None):
        """The grain ``MapDataset`` of evaluation batches covering the test split once (the last one padded)."""
        import grain

        share = share or ProcessShare.current()
        fn = EvalBatch(self.manifest.paths("test"), self.num_test, batch_size, share, self.image_size)
        return grain.MapDataset.range(-(-self.num_test // batch_size)).map(fn)


def host_iterator(steps, *, start: int = 0, threads: int = 16, workers: int = 0, buffer: int = 32):
    """A grain ``DatasetIterator`` over a ``MapDataset`` of steps, positioned at element ``start``.

    ``threads`` read and decode in parallel inside this process; ``workers > 0`` adds that many processes
    (``mp_prefetch``). Resuming: either ``start=global_step`` (nothing but the step needs checkpointing, since
    element s is step s), or ``set_state`` of a saved ``get_state()`` (a JSON-able dict; with workers it describes
    each worker's position).
    """
    import grain

    if workers > 0 and start:
        # with worker processes grain's state is per worker; element s is a pure function of s, so the slice of the
        # steps from ``start`` on is the same stream
        steps, start = steps[int(start):], 0
    dataset = steps.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=buffer))
    if workers > 0:
        from absl import flags

        # grain's workers read its absl flags; a program that never parses absl flags (a library caller, pytest)
        # would fail there, so they take their defaults
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    iterator = iter(dataset)
    if start:
        iterator.set_state({"next_index": int(start)})
    return iterator


def to_global(batch: dict, mesh) -> dict:
    """This process's rows -> global ``jax.Array``s sharded along the batch over the ("data",) mesh."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    count = jax.process_count()
    return {key: jax.make_array_from_process_local_data(sharding, value, (value.shape[0] * count,) + value.shape[1:])
            for key, value in batch.items()}


class DeviceIterator:
    """Global batches on the mesh, ``buffer`` ahead: the transfers of the next steps overlap the current one.

    Wraps a ``host_iterator``; ``get_state()`` returns the host position of the next batch *not yet consumed* by
    the caller (batches in flight are re-read after a restore), so it can be checkpointed after any step.
    """

    def __init__(self, host, mesh, buffer: int = 2):
        self.host, self.mesh, self.buffer, self.queue = host, mesh, max(int(buffer), 1), []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self.queue) < self.buffer:
            state = self.host.get_state()
            try:
                batch = next(self.host)
            except StopIteration:
                break
            self.queue.append((state, to_global(batch, self.mesh)))
        if not self.queue:
            raise StopIteration
        return self.queue.pop(0)[1]

    def get_state(self) -> dict:
        return self.queue[0][0] if self.queue else self.host.get_state()

    def set_state(self, state: dict) -> None:
        self.queue.clear()
        self.host.set_state(state)

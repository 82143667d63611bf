"""Preparation, once: ImageNet-format inputs -> ArrayRecord shards + manifest (``kdjax.data.streamed.records``).

    python -m kdjax.data.streamed --dataset=imagenet --manual_dir=DIR [--data_dir=DIR] [--workers=N]

Steps: index the inputs (``inputs.find_inputs``; a truncated archive or a missing class stops here, before any
shard is written), split each split into shards of ``records_per_shard`` consecutive examples, write the shards in
a process pool (every image is decoded once on the way, at 1/8 scale, so that an unreadable image stops the run
with its name), then write the manifest.

Resumable: a shard is written to a temporary file, renamed, and only then gets its ``.done`` marker (count, SHA-256,
the digest of the inputs' index). A rerun after a kill keeps every shard with a marker whose digest still matches
the file and rewrites the rest. The manifest, written last and atomically, is what makes the folder a dataset, so a
half-written dataset is never read. A rerun on different inputs (other files, another class list or shard size) is
refused instead of mixing the two.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from kdjax.data.streamed import inputs as inputs_lib
from kdjax.data.streamed import records
from kdjax.data.streamed.inputs import ImageRef, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the original's dataset/imagenet.py, as torchvision's ImageNet models
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RECORDS_PER_SHARD = 1024        # ImageNet: 1252 train shards of about 110 MB
INPUTS_FILE = "inputs.json"


# The datasets this module prepares (the others load into memory).
DATASETS = ("imagenet", "imagenet100")


def dataset_classes(name: str) -> tuple[str, ...]:
    """The wnids of a streamed dataset, in label order."""
    if name == "imagenet":
        return inputs_lib.imagenet_classes()
    if name == "imagenet100":
        return inputs_lib.IMAGENET100_CLASSES
    raise ValueError(f"unknown streamed dataset {name!r}: use {' or '.join(DATASETS)}")


def dataset_root(data_dir, name: str) -> pathlib.Path:
    """Where the prepared records of ``name`` live: ``<data_dir>/kdjax_records/<name>``."""
    return pathlib.Path(data_dir).expanduser() / "kdjax_records" / name


@dataclasses.dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    num_shards: int
    first: int
    refs: tuple[ImageRef, ...]
    root: str
    inputs_digest: str

    @property
    def file(self) -> str:
        return records.shard_name(self.split, self.index, self.num_shards)


def _inputs_digest(refs_by_split: dict, records_per_shard: int, classes: Sequence[str]) -> str:
    """What the shards are a function of: each image's name, size and label, the class list and the shard size."""
    h = hashlib.sha256(json.dumps([list(classes), records_per_shard]).encode())
    for split in records.SPLITS:
        for ref in refs_by_split[split]:
            h.update(f"{split}\0{ref.name}\0{ref.size}\0{ref.label}\n".encode())
    return h.hexdigest()


def plan_jobs(refs_by_split: dict, root: pathlib.Path, records_per_shard: int, digest: str) -> list[ShardJob]:
    jobs = []
    for split in records.SPLITS:
        refs = refs_by_split[split]
        num_shards = max(1, -(-len(refs) // records_per_shard))
        for k in range(num_shards):
            first = k * records_per_shard
            jobs.append(ShardJob(split, k, num_shards, first, tuple(refs[first:first + records_per_shard]),
                                 str(root), digest))
    return jobs


def read_image_bytes(ref: ImageRef) -> bytes:
    with open(ref.path, "rb") as f:
        data = os.pread(f.fileno(), ref.size, ref.offset)
    if len(data) != ref.size:
        raise InputError(f"{ref.name} is cut short ({len(data)} of {ref.size} bytes): the input is truncated; "
                         "download it again")
    return data


def check_decodable(data: bytes, name: str) -> None:
    """Decode ``data`` completely (JPEGs at 1/8 scale: libjpeg still reads every coefficient, so a truncated or
    corrupt file fails, at a fraction of a full decode's cost); raise InputError naming the image otherwise."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise InputError(f"{name} cannot be decoded ({type(e).__name__}: {e}): the input is damaged; replace "
                         "it") from None


def marker_path(root: pathlib.Path, file: str) -> pathlib.Path:
    return root / (file.removesuffix(".array_record") + ".done")


def write_shard(job: ShardJob) -> dict:
    """Write one shard (temporary file, rename, then its marker); return the marker's content."""
    from array_record.python.array_record_module import ArrayRecordWriter

    root = pathlib.Path(job.root)
    final, tmp = root / job.file, root / (job.file + ".tmp")
    # group_size:1 makes every record individually addressable: random access reads one record, not a group.
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    try:
        for offset, ref in enumerate(job.refs):
            data = read_image_bytes(ref)
            check_decodable(data, ref.name)
            writer.write(records.encode_record(data, ref.label, job.first + offset))
    finally:
        writer.close()
    digest = records.file_sha256(tmp)
    os.replace(tmp, final)
    marker = {"file": job.file, "first": job.first, "count": len(job.refs), "sha256": digest,
              "inputs": job.inputs_digest}
    _write_json_atomically(marker_path(root, job.file), marker)
    return marker


def _write_json_atomically(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def completed_marker(job: ShardJob) -> dict | None:
    """The marker of a shard finished by an earlier run, if its file is intact; None when it must be written."""
    root = pathlib.Path(job.root)
    path = marker_path(root, job.file)
    if not path.exists() or not (root / job.file).exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except ValueError:
        return None
    if marker.get("inputs") != job.inputs_digest or marker.get("count") != len(job.refs):
        return None
    return marker if records.file_sha256(root / job.file) == marker["sha256"] else None


def _check_same_inputs(root: pathlib.Path, digest: str) -> None:
    path = root / INPUTS_FILE
    if path.exists():
        earlier = json.loads(path.read_text()).get("inputs")
        if earlier != digest:
            raise InputError(f"{root} holds a (partial) dataset prepared from other inputs, classes or shard size: "
                             "delete that folder or choose another --data_dir")
    else:
        _write_json_atomically(path, {"inputs": digest})


class Progress:
    """One line per ``every`` seconds on stderr: shards, images, rate and the ETA of this run."""

    def __init__(self, name: str, total_images: int, total_shards: int, every: float = 5.0, stream=sys.stderr):
        self.name, self.total_images, self.total_shards, self.every, self.stream = (name, total_images,
                                                                                     total_shards, every, stream)
        self.started = self.last = time.monotonic()
        self.images = self.shards = self.fresh_images = 0

    def update(self, images: int, fresh: bool) -> None:
        self.images += images
        self.shards += 1
        self.fresh_images += images if fresh else 0
        now = time.monotonic()
        if now - self.last >= self.every or self.shards == self.total_shards:
            self.last = now
            rate = self.fresh_images / max(now - self.started, 1e-9)
            left = self.total_images - self.images
            eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?"
            print(f"prepare {self.name}: {self.shards}/{self.total_shards} shards, {self.images}/{self.total_images} "
                  f"images, {rate:.0f} images/s, ETA {eta}", file=self.stream, flush=True)


def _run_jobs(jobs: list[ShardJob], workers: int):
    """The markers of ``jobs`` as they finish: in a process pool, or in this process for one worker."""
    if workers == 1:
        yield from map(write_shard, jobs)
        return
    # spawn, not fork: the caller may have imported JAX, whose threads do not survive a fork.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(write_shard, jobs)


def label_counts(refs: Sequence[ImageRef], num_classes: int) -> tuple[int, ...]:
    """Images per class of a split whose refs are in label order (``inputs.find_inputs``'s ImageFolder order)."""
    labels = [ref.label for ref in refs]
    if any(b < a for a, b in zip(labels, labels[1:])):
        raise AssertionError("the image index is not in label order")  # find_inputs sorts it: a bug if reached
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    return tuple(counts)


def prepare_dataset(name: str, manual_dir, data_dir, *, classes: Sequence[str] | None = None,
            records_per_shard: int = DEFAULT_RECORDS_PER_SHARD, workers: int | None = None,
            progress_every: float = 5.0) -> records.Manifest:
    """Prepare ``name`` from ``manual_dir`` into ``dataset_root(data_dir, name)`` and return its manifest.

    ``classes`` overrides the dataset's class list (a subset of your own; tests). ``workers``: processes writing
    shards (default: all cores). Already prepared (manifest present, same inputs): returns at once.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    classes = tuple(dataset_classes(name) if classes is None else sorted(classes))
    refs_by_split = inputs_lib.find_inputs(pathlib.Path(manual_dir), classes)
    root = dataset_root(data_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    digest = _inputs_digest(refs_by_split, records_per_shard, classes)
    _check_same_inputs(root, digest)
    if (root / records.MANIFEST).exists():
        return records.read_manifest(root)
    jobs = plan_jobs(refs_by_split, root, records_per_shard, digest)
    progress = Progress(name, sum(len(j.refs) for j in jobs), len(jobs), progress_every)
    markers, todo = {}, []
    # re-hashing the shards of an earlier run is I/O bound: threads (hashlib releases the GIL)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        earlier = list(pool.map(completed_marker, jobs))
    for job, marker in zip(jobs, earlier):
        if marker is None:
            todo.append(job)
        else:
            markers[job.file] = marker
            progress.update(marker["count"], fresh=False)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    for marker in _run_jobs(todo, workers):
        markers[marker["file"]] = marker
        progress.update(marker["count"], fresh=True)
    shards = {split: tuple(records.Shard(file=j.file, first=j.first, count=len(j.refs),
                                         sha256=markers[j.file]["sha256"]) for j in jobs if j.split == split)
              for split in records.SPLITS}
    manifest = records.Manifest(name=name, classes=classes, mean=IMAGENET_MEAN, std=IMAGENET_STD, shards=shards,
                                root=root, label_counts={split: label_counts(refs_by_split[split], len(classes))
                                                         for split in records.SPLITS})
    records.write_manifest(manifest, root)
    records.record_verified(manifest)  # the digests were computed from the bytes just written or re-hashed above
    return manifest


def prepare_from_config(config) -> records.Manifest:
    """``prepare_dataset`` from a task config's fields: ``dataset``, ``manual_dir``, ``data_dir`` and the optional
    ``classes`` (a subset of wnids of your own), ``workers`` and ``records_per_shard`` (``kdjax prepare_data``)."""
    from kdjax.data.core import resolve_dirs

    data_dir, manual_dir = resolve_dirs(config.get("data_dir"), config.get("manual_dir"))
    classes = config.get("classes")
    return prepare_dataset(config.dataset, manual_dir, data_dir, classes=sorted(classes) if classes else None,
                           workers=config.get("workers"),
                           records_per_shard=config.get("records_per_shard") or DEFAULT_RECORDS_PER_SHARD)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdjax.data.streamed", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--manual_dir", required=True, help="folder with the official tars or train/ and val/")
    parser.add_argument("--data_dir", default=None, help="default: $KDJAX_DATA_DIR or ~/tensorflow_datasets")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--records_per_shard", type=int, default=DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--classes", default=None,
                        help="comma-separated wnids: a class subset of your own instead of the dataset's list")
    args = parser.parse_args(argv)
    from kdjax.data.core import resolve_dirs

    data_dir, _ = resolve_dirs(args.data_dir, args.manual_dir)
    try:
        classes = sorted(args.classes.split(",")) if args.classes else None
        manifest = prepare_dataset(args.dataset, args.manual_dir, data_dir, classes=classes, workers=args.workers,
                           records_per_shard=args.records_per_shard)
    except (InputError, records.CorruptShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{manifest.name}: {manifest.count('train')} train / {manifest.count('test')} test images in "
          f"{manifest.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The on-disk form of a streamed dataset: ArrayRecord shards of encoded images and a manifest that lists them.

A prepared dataset is one folder::

    <root>/manifest.json                          written last: its presence means "complete"
    <root>/train-00000-of-01252.array_record      shard files, records in example-index order
    <root>/train-00000-of-01252.done              completion marker of that shard (count, sha256, inputs' digest)
    ...

A record is ``RECORD_HEADER`` (little-endian int32 label, int64 example index) followed by the image file's bytes as
they were in the archive (JPEG for ImageNet): nothing is re-encoded, so preparation loses nothing and decoding
happens in the loader's workers. Shard ``k`` of a split holds the examples ``[first, first + count)`` in order, so the
concatenation of the shards is the split in example-index order (the original's ``ImageFolder`` order).

Every shard's SHA-256 is in the manifest; ``open_manifest`` recomputes them (``verify=True``) so that a shard changed
or damaged after preparation is refused before any batch is read from it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence
from kdjax.errors import KdjaxError

FORMAT = "kdjax-image-records-v1"
MANIFEST = "manifest.json"
RECORD_HEADER = struct.Struct("<iq")  # label, example index
SPLITS = ("train", "test")


class CorruptShardError(KdjaxError, ValueError):
    """A shard's content does not match the digest its manifest records."""


class NotPreparedError(FileNotFoundError):
    """The folder holds no complete prepared dataset."""


def encode_record(image_bytes: bytes, label: int, index: int) -> bytes:
    return RECORD_HEADER.pack(int(label), int(index)) + bytes(image_bytes)


def decode_record(record: bytes) -> tuple[bytes, int, int]:
    """``(image_bytes, label, index)`` of one record."""
    label, index = RECORD_HEADER.unpack_from(record)
    return record[RECORD_HEADER.size:], label, index


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def file_sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str       # name inside the dataset folder
    first: int      # example index of its first record
    count: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a prepared dataset holds: classes (label i is ``classes[i]``), shards per split, normalisation stats."""

    name: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    shards: dict            # split -> tuple[Shard, ...]
    root: pathlib.Path = dataclasses.field(default=pathlib.Path("."), compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        return sum(s.count for s in self.shards[split])

    def paths(self, split: str) -> list[pathlib.Path]:
        return [self.root / s.file for s in self.shards[split]]

    def to_json(self) -> dict:
        return {"format": FORMAT, "name": self.name, "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std),
                "counts": {split: self.count(split) for split in self.shards},
                "shards": {split: [dataclasses.asdict(s) for s in shards] for split, shards in self.shards.items()}}


def write_manifest(manifest: Manifest, root: pathlib.Path) -> None:
    """Atomically (temporary file, then rename): a reader sees no manifest or a whole one."""
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1))
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: pathlib.Path) -> Manifest:
    root = pathlib.Path(root).expanduser()
    path = root / MANIFEST
    if not path.exists():
        raise NotPreparedError(f"{root} holds no prepared dataset ({MANIFEST} is missing): run kdjax prepare_data "
                               "(python -m kdjax.data.streamed) for it first")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is format {data.get('format')!r}, expected {FORMAT!r}: prepare the dataset again")
    shards = {split: tuple(Shard(**s) for s in items) for split, items in data["shards"].items()}
    return Manifest(name=data["name"], classes=tuple(data["classes"]), mean=tuple(data["mean"]),
                    std=tuple(data["std"]), shards=shards, root=root)


def verify_shards(manifest: Manifest, splits: Sequence[str] = SPLITS, threads: int | None = None) -> None:
    """Raise CorruptShardError naming the first shard whose SHA-256 or presence differs from the manifest.

    Hashing runs in threads (hashlib releases the GIL on large buffers): ImageNet's 150 GB take minutes on one
    core, a fraction of that on many.
    """
    items = [(manifest.root / s.file, s.sha256) for split in splits for s in manifest.shards[split]]
    for path, _ in items:
        if not path.exists():
            raise CorruptShardError(f"{path} is missing: the prepared dataset in {manifest.root} is incomplete; "
                                    "run prepare_data again")
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        digests = list(pool.map(lambda item: file_sha256(item[0]), items))
    for (path, expected), actual in zip(items, digests):
        if actual != expected:
            raise CorruptShardError(f"{path} has sha256 {actual[:16]}..., the manifest says {expected[:16]}...: the "
                                    f"shard is corrupt; delete it and its .done marker and run prepare_data again")


def open_manifest(root, verify: bool = True) -> Manifest:
    """The manifest of the prepared dataset in ``root``; with ``verify`` every shard's digest is checked first."""
    manifest = read_manifest(pathlib.Path(root))
    if verify:
        verify_shards(manifest)
    return manifest

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

Every shard's SHA-256 is in the manifest; ``open_manifest`` recomputes them (``verify``) so that a shard changed
or damaged after preparation is refused before any batch is read from it: every shard on ``'always'``, only those
whose size, mtime or ctime changed since their digest last matched on ``'changed'`` (``verified.json``).
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
    # split -> images per class: records are in label order (ImageFolder's), so the labels of a split in example
    # order are these counts run-length decoded (``labels``); None in a manifest written before they were recorded
    label_counts: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        return sum(s.count for s in self.shards[split])

    def paths(self, split: str) -> list[pathlib.Path]:
        return [self.root / s.file for s in self.shards[split]]

    def labels(self, split: str):
        """int32 [count(split)]: the label of every example of ``split`` in example-index order (CRD's class tables
        and memory banks), without reading a record."""
        import numpy as np

        if self.label_counts is None:
            raise NotPreparedError(f"{self.root / MANIFEST} predates the per-class counts that the labels are read "
                                   f"from: delete it and run kdjax prepare_data again (the shards are kept; only "
                                   f"the manifest is rewritten)")
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), self.label_counts[split])

    def to_json(self) -> dict:
        return {"format": FORMAT, "name": self.name, "classes": list(self.classes), "mean": list(self.mean),
                "std": list(self.std),
                "counts": {split: self.count(split) for split in self.shards},
                "shards": {split: [dataclasses.asdict(s) for s in shards] for split, shards in self.shards.items()},
                **({} if self.label_counts is None else
                   {"label_counts": {split: list(c) for split, c in self.label_counts.items()}})}


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
    counts = data.get("label_counts")
    return Manifest(name=data["name"], classes=tuple(data["classes"]), mean=tuple(data["mean"]),
                    std=tuple(data["std"]), shards=shards, root=root,
                    label_counts=None if counts is None else {k: tuple(v) for k, v in counts.items()})


VERIFY_MODES = ("changed", "always")
VERIFIED = "verified.json"  # beside the manifest: each shard's file identity when its digest last matched


def _identity(path: pathlib.Path) -> dict:
    """What changes when a file's bytes are written: size, modification and status-change times. ``ctime`` is
    set by the kernel on every write and on ``utime`` itself, so a shard damaged and given back its old mtime still
    differs here."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _read_verified(root: pathlib.Path) -> dict:
    try:
        return json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


def _write_verified(root: pathlib.Path, verified: dict) -> None:
    """Best effort: a read-only dataset folder just re-hashes on every launch."""
    tmp = root / (VERIFIED + ".tmp")
    try:
        tmp.write_text(json.dumps(verified, indent=1))
        os.replace(tmp, root / VERIFIED)
    except OSError:
        pass


def verify_shards(manifest: Manifest, splits: Sequence[str] = SPLITS, threads: int | None = None,
                  mode: str = "changed") -> list[str]:
    """Raise CorruptShardError naming the first shard whose SHA-256 or presence differs from the manifest; returns
    the files it hashed.

    ``mode='always'`` hashes every shard. ``'changed'`` hashes only the shards whose size, mtime or ctime differ from
    those recorded in ``verified.json`` when their digest last matched (ImageNet's 150 GB take about 7 core-minutes
    to hash; an unchanged dataset is then checked by ``stat`` alone). Any write to a shard changes its ctime, so a
    damaged shard is hashed again and refused. Hashing runs in threads (hashlib releases the GIL on large buffers).
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {mode!r}")
    items = [(manifest.root / s.file, s.sha256) for split in splits for s in manifest.shards[split]]
    for path, _ in items:
        if not path.exists():
            raise CorruptShardError(f"{path} is missing: the prepared dataset in {manifest.root} is incomplete; "
                                    "run prepare_data again")
    verified = _read_verified(manifest.root)
    identities = {path.name: _identity(path) for path, _ in items}
    todo = [(path, expected) for path, expected in items
            if mode == "always" or verified.get(path.name) != {**identities[path.name], "sha256": expected}]
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        digests = list(pool.map(lambda item: file_sha256(item[0]), todo))
    for (path, expected), actual in zip(todo, digests):
        if actual != expected:
            verified.pop(path.name, None)
            _write_verified(manifest.root, verified)
            raise CorruptShardError(f"{path} has sha256 {actual[:16]}..., the manifest says {expected[:16]}...: the "
                                    f"shard is corrupt; delete it and its .done marker and run prepare_data again")
    if todo:
        verified.update({path.name: {**identities[path.name], "sha256": expected} for path, expected in todo})
        _write_verified(manifest.root, verified)
    return [path.name for path, _ in todo]


def record_verified(manifest: Manifest) -> None:
    """Record every shard's current identity beside the digest its preparation just computed, so that the first
    launch after ``prepare_data`` does not hash the dataset again."""
    entries = {s.file: {**_identity(manifest.root / s.file), "sha256": s.sha256}
               for split in manifest.shards for s in manifest.shards[split]}
    _write_verified(manifest.root, {**_read_verified(manifest.root), **entries})


def open_manifest(root, verify: bool | str = True) -> Manifest:
    """The manifest of the prepared dataset in ``root``; ``verify`` (True: ``'changed'``, or ``'always'``; False:
    not at all) checks the shards' digests first (``verify_shards``)."""
    manifest = read_manifest(pathlib.Path(root))
    if verify:
        verify_shards(manifest, mode="changed" if verify is True else verify)
    return manifest

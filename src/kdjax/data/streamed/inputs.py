"""Where the images of an ImageNet-format dataset are in the user's files, before anything is read.

Two layouts of the manual directory are understood:

* the official archives: ``ILSVRC2012_img_train.tar`` (a tar of one ``<wnid>.tar`` per class, each a tar of JPEGs)
  and ``ILSVRC2012_img_val.tar`` (50,000 flat ``ILSVRC2012_val_<n>.JPEG``). The validation labels are the ground
  truth of the ILSVRC2012 devkit as tensorflow-datasets ships it (``validation_labels.txt``: line n is the wnid of
  ``ILSVRC2012_val_<n>.JPEG``); torchvision derives the same mapping from the devkit's ``meta.mat`` and
  ``ILSVRC2012_validation_ground_truth.txt``.
* the ``ImageFolder`` tree the original reads: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

Either way the result is a list of ``ImageRef`` per split, in the order of torchvision's ``ImageFolder`` over the
extracted tree (classes sorted, files sorted by name within a class), so that example index i here is index i of
the original's dataset (CRD's memory banks are indexed by it). An archive's members are located by byte offset, so
preparation workers read each image with one ``pread`` and never re-scan a tar.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import tarfile
from typing import Iterable, Sequence
from kdjax.errors import KdjaxError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS), compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# ImageNet-100 of the original (Good-DA-in-KD, data/imagenet100.zip: the folder
# imagenet_subset_100_RandSeed20220726_0/{train,val}/ links these 100 class folders of the full ImageNet tree).
# Labels are their positions in this sorted list, as ImageFolder assigns them.
IMAGENET100_CLASSES = tuple("""
n01537544 n01592084 n01629819 n01632777 n01667778 n01669191 n01677366 n01682714 n01735189 n01796340
n01806143 n01819313 n01978455 n01980166 n01981276 n01985128 n01986214 n02009229 n02027492 n02033041
n02085620 n02085782 n02085936 n02091635 n02093991 n02098105 n02100735 n02104029 n02104365 n02109047
n02109525 n02110341 n02113023 n02123159 n02127052 n02138441 n02167151 n02364673 n02410509 n02454379
n02483708 n02486261 n02492035 n02641379 n02655020 n02793495 n02804610 n02840245 n02841315 n02843684
n02860847 n02951358 n02974003 n02978881 n03041632 n03126707 n03344393 n03372029 n03379051 n03384352
n03400231 n03538406 n03598930 n03642806 n03673027 n03680355 n03729826 n03777568 n03787032 n03791053
n03794056 n03814639 n03887697 n03888605 n03933933 n03947888 n03983396 n04004767 n04116512 n04118538
n04127249 n04133789 n04149813 n04208210 n04229816 n04355933 n04372370 n04456115 n04458633 n04467665
n04483307 n04591713 n06794110 n07565083 n07715103 n07753113 n07760859 n09193705 n12768682 n13040303
""".split())


class InputError(KdjaxError, ValueError):
    """An input archive or folder is unusable: truncated, missing a class, unreadable. The message names it."""


@dataclasses.dataclass(frozen=True, slots=True)  # slots: ImageNet's index holds 1.33 million of them
class ImageRef:
    """One image: ``size`` bytes at ``offset`` of ``path`` (an archive, or the image file itself), its label."""
    path: str
    offset: int
    size: int
    label: int
    name: str   # for messages: "<archive>:<member>" or the file path


def _tfds_file(name: str) -> pathlib.Path:
    # Located without importing tensorflow_datasets (a heavy import) - only its data files are needed.
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("tensorflow-datasets is not installed; it ships the ImageNet class and validation label "
                         "lists: pip install tensorflow-datasets")
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "imagenet2012" / name


def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 wnids, sorted (label order of ImageFolder over the train tree)."""
    return tuple(sorted(_tfds_file("labels.txt").read_text().split()))


def validation_wnids() -> list[str]:
    """Entry n-1 is the wnid of ``ILSVRC2012_val_<n>.JPEG`` (the devkit's ground truth)."""
    return _tfds_file("validation_labels.txt").read_text().split()


# --- tar archives

def _members(tar: tarfile.TarFile, archive: str, file_size: int, base: int = 0) -> list[tarfile.TarInfo]:
    """The regular-file members of ``tar``, refusing a truncated archive.

    tarfile stops silently when a file ends at a member boundary, so completeness is checked explicitly: every
    member's data must lie inside the file and the end-of-archive (zero) block must follow the last member.
    """
    try:
        members = [m for m in tar if m.isfile()]
    except (tarfile.ReadError, EOFError, OSError) as e:
        raise InputError(f"{archive} is truncated or damaged ({e}): download it again") from None
    for m in members:
        if base + m.offset_data + m.size > file_size:
            raise InputError(f"{archive} is truncated inside {m.name}: download it again")
    tar.fileobj.seek(tar.offset)
    end_block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(end_block) < tarfile.BLOCKSIZE or end_block.strip(b"\0"):
        raise InputError(f"{archive} is truncated after {members[-1].name if members else 'its start'} (no "
                         f"end-of-archive block): download it again")
    return members


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open_tar(path: pathlib.Path) -> tarfile.TarFile:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        raise InputError(f"{path} is not a tar archive ({e}): download it again") from None


def index_train_tar(path: pathlib.Path, classes: Sequence[str]) -> list[ImageRef]:
    """The images of ``classes`` in ILSVRC2012_img_train.tar (a tar of ``<wnid>.tar``), ImageFolder order."""
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    file_size = path.stat().st_size if path.exists() else 0
    per_class: dict[str, list[ImageRef]] = {}
    with _open_tar(path) as outer:
        for member in _members(outer, path.name, file_size):
            wnid = pathlib.PurePosixPath(member.name).name.removesuffix(".tar")
            if wnid not in label_of:
                continue
            where = f"{path.name}:{member.name}"
            try:
                inner = tarfile.open(fileobj=outer.extractfile(member), mode="r:")
            except tarfile.ReadError as e:
                raise InputError(f"{where} is not a tar archive ({e}): {path.name} is damaged; download it "
                                 "again") from None
            with inner:
                images = _members(inner, where, member.size)
            per_class[wnid] = sorted(
                (ImageRef(str(path), member.offset_data + m.offset_data, m.size, label_of[wnid],
                          f"{where}:{m.name}") for m in images if _is_image(m.name)),
                key=lambda ref: pathlib.PurePosixPath(ref.name).name)
    _require_classes(per_class, classes, f"{path.name} has no {{wnid}}.tar")
    return [ref for wnid in classes for ref in per_class[wnid]]


def index_val_tar(path: pathlib.Path, classes: Sequence[str],
                  wnid_of_file: dict[str, str] | None = None) -> list[ImageRef]:
    """The images of ``classes`` in ILSVRC2012_img_val.tar (flat JPEGs), labelled from ``wnid_of_file`` (default:
    the devkit's ground truth), in ImageFolder order over ``val/<wnid>/``."""
    if wnid_of_file is None:
        wnid_of_file = {f"ILSVRC2012_val_{n:08d}.JPEG": wnid for n, wnid in enumerate(validation_wnids(), 1)}
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    file_size = path.stat().st_size if path.exists() else 0
    refs = []
    with _open_tar(path) as tar:
        for m in _members(tar, path.name, file_size):
            name = pathlib.PurePosixPath(m.name).name
            if not _is_image(name):
                continue
            if name not in wnid_of_file:
                raise InputError(f"{path.name}:{m.name} has no validation label: this is not the official "
                                 f"{VAL_TAR}")
            wnid = wnid_of_file[name]
            if wnid in label_of:
                refs.append(ImageRef(str(path), m.offset_data, m.size, label_of[wnid], f"{path.name}:{m.name}"))
    refs.sort(key=lambda ref: (ref.label, pathlib.PurePosixPath(ref.name).name))
    _require_classes({classes[r.label] for r in refs}, classes, f"{path.name} has no image of {{wnid}}")
    return refs


# --- ImageFolder tree

def index_image_folder(root: pathlib.Path, classes: Sequence[str]) -> list[ImageRef]:
    """The images of ``classes`` under ``root/<wnid>/`` in torchvision ImageFolder order (os.walk, sorted)."""
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    refs, present = [], set()
    for wnid in classes:
        folder = root / wnid
        if not folder.is_dir():
            continue
        for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
            for filename in sorted(filenames):
                if _is_image(filename):
                    file = pathlib.Path(dirpath) / filename
                    refs.append(ImageRef(str(file), 0, file.stat().st_size, label_of[wnid], str(file)))
                    present.add(wnid)
    _require_classes(present, classes, f"{root} has no image in {{wnid}}/")
    return refs


def _require_classes(present: Iterable[str], classes: Sequence[str], message: str) -> None:
    present = set(present)
    missing = [wnid for wnid in classes if wnid not in present]
    if missing:
        more = f" (and {len(missing) - 1} more classes)" if len(missing) > 1 else ""
        raise InputError(message.format(wnid=missing[0]) + f"{more}: the input is incomplete; the dataset needs "
                         f"all {len(classes)} classes")


def find_inputs(manual_dir: pathlib.Path, classes: Sequence[str]) -> dict[str, list[ImageRef]]:
    """``{"train": refs, "test": refs}`` from the archives in ``manual_dir``, else its ``train/``/``val/`` tree."""
    manual_dir = pathlib.Path(manual_dir).expanduser()
    if (manual_dir / TRAIN_TAR).exists() or (manual_dir / VAL_TAR).exists():
        for name in (TRAIN_TAR, VAL_TAR):
            if not (manual_dir / name).exists():
                raise InputError(f"{manual_dir} has {TRAIN_TAR if name == VAL_TAR else VAL_TAR} but not {name}: "
                                 "put both official archives there")
        return {"train": index_train_tar(manual_dir / TRAIN_TAR, classes),
                "test": index_val_tar(manual_dir / VAL_TAR, classes)}
    if (manual_dir / "train").is_dir() and (manual_dir / "val").is_dir():
        return {"train": index_image_folder(manual_dir / "train", classes),
                "test": index_image_folder(manual_dir / "val", classes)}
    raise InputError(f"{manual_dir} has neither {TRAIN_TAR} + {VAL_TAR} nor an ImageFolder tree train/<wnid>/, "
                     "val/<wnid>/: put the official ImageNet archives there or name the folder that has them (manual_dir)")

"""Import every teacher of an archive of the original PyTorch teachers in one command.

``cifar_teachers.tar`` (CRD's teachers as mdistiller repackages them: ``cifar_teachers/<model>_vanilla/
ckpt_epoch_240.pth``) or a directory in RepDistiller's ``save/models/<model>_vanilla/ckpt_epoch_<n>.pth`` layout:
each ``<model>_vanilla/ckpt_epoch_<n>.pth`` whose ``<model>`` is a zoo name becomes a finished kdjax teacher workdir
``<workdir>/<model>/`` (checkpoint + ``results.json`` with the checkpoint's digest and the source file's SHA-256),
the one of the highest epoch when a model has several (RepDistiller keeps every ``save_freq`` epochs). Every other
file (``<model>_best.pth``, an unknown model, a README) is listed, never guessed at. ``kdjax sweep
--config.teacher_dir=<workdir>`` then uses them (``teacher_dirs``).

The tar is read member by member into a temporary file (regular files only: no links, nothing extracted under the
member's own name), and each file goes through the bounded ``.pth`` reader.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from typing import Dict, List, Optional, Tuple

from kdjax.checkpoint.torch_pickle import TorchCheckpointError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# <anything>/<model>_vanilla/ckpt_epoch_<n>.pth: CRD's and RepDistiller's teacher layout
TEACHER_MEMBER = re.compile(r"(?:^|/)(?P<model>[^/]+)_vanilla/ckpt_epoch_(?P<epoch>\d+)\.pth$")
RESULTS = "results.json"
_CHUNK = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Teacher:
    model: str
    member: str  # path inside the archive (or relative to the directory)
    epoch: int


def is_archive(source: str) -> bool:
    """A teacher archive (tar) or directory, rather than one checkpoint file."""
    return os.path.isdir(source) or source.endswith(ARCHIVE_SUFFIXES)


def list_files(source: str) -> List[str]:
    """The regular files of a tar (member names) or a directory (relative paths), sorted."""
    if os.path.isdir(source):
        return sorted(os.path.relpath(os.path.join(root, f), source).replace(os.sep, "/")
                      for root, _, files in os.walk(source) for f in files)
    try:
        with tarfile.open(source) as tar:
            return sorted(m.name for m in tar.getmembers() if m.isfile())
    except (tarfile.TarError, OSError, EOFError) as e:
        reason = str(e).splitlines()[-1].strip(" -")  # tarfile lists each compression it tried, one a line
        raise ValueError(f"{source}: not a readable tar archive ({reason}); give cifar_teachers.tar, a directory of "
                         f"<model>_vanilla/ckpt_epoch_240.pth files, or one .pth file") from None


def find_teachers(files: List[str], zoo: List[str]) -> Tuple[List[Teacher], List[str]]:
    """(the teachers, one per zoo model at its highest epoch; every other file with why it is left out)."""
    found: Dict[str, Teacher] = {}
    left_out = []
    for name in files:
        match = TEACHER_MEMBER.search(name)
        if not match:
            left_out.append(f"{name} (not <model>_vanilla/ckpt_epoch_<n>.pth)")
            continue
        if match["model"] not in zoo:
            left_out.append(f"{name} (no zoo model {match['model']!r})")
            continue
        teacher = Teacher(match["model"], name, int(match["epoch"]))
        earlier = found.get(teacher.model)
        if earlier is not None and earlier.epoch == teacher.epoch:
            raise ValueError(f"two files hold {teacher.model} at epoch {teacher.epoch}: {earlier.member} and "
                             f"{name}; import the right one with --config.model={teacher.model} "
                             f"--config.source=FILE")
        if earlier is None or teacher.epoch > earlier.epoch:
            if earlier is not None:
                left_out.append(f"{earlier.member} (an earlier epoch of {teacher.model})")
            found[teacher.model] = teacher
        else:
            left_out.append(f"{name} (an earlier epoch of {teacher.model})")
    return sorted(found.values(), key=lambda t: t.model), left_out


def _copy_hashing(reader, writer) -> str:
    digest = hashlib.sha256()
    while chunk := reader.read(_CHUNK):
        digest.update(chunk)
        writer.write(chunk)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        digest = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_teacher(path: str, model: str, num_classes: int, image_size: int, dataset: str, source: str,
                 sha256: str):
    """``(variables, meta)`` of one ``.pth``/``.safetensors`` file as a kdjax teacher of ``model`` (``source`` and
    ``sha256`` name the original file, ``path`` may be a temporary copy of it)."""
    from kdjax.checkpoint.torch_import import read_torch_checkpoint, torch_to_variables
    from kdjax.data.archives import STATS

    state_dict, info = read_torch_checkpoint(path)
    variables = torch_to_variables(state_dict, model, int(num_classes), int(image_size), source=source)
    mean, std = STATS.get(dataset, (None, None))  # the datasets the original teachers know
    meta = {"model": model, "num_classes": int(num_classes), "image_size": int(image_size), "dataset": dataset,
            "mean": mean, "std": std, "source": source, "source_sha256": sha256,
            "accuracy": info.get("accuracy"), "epoch": info.get("epoch")}
    return variables, meta


def save_teacher(out_dir: str, variables, meta) -> dict:
    """Write the teacher's checkpoint into ``out_dir``; returns its results record (with the arrays' digest)."""
    from kdjax.checkpoint.store import CHECKPOINT_SUBDIR, save_model, state_digest
    save_model(os.path.join(out_dir, CHECKPOINT_SUBDIR), variables, meta)
    return {"task": "import_torch", **meta, "digest": state_digest(variables)}


def import_teacher(path: str, model: str, num_classes: int, image_size: int, dataset: str, out_dir: str,
                   source: str, sha256: str, config=None) -> dict:
    """Import one file as the teacher workdir ``out_dir`` (an archive's member); returns its results record."""
    from kdjax import runlog
    record = save_teacher(out_dir, *read_teacher(path, model, num_classes, image_size, dataset, source, sha256))
    # written last: it marks the teacher as finished for the runs that consume it
    runlog.write_results(out_dir, record, config)
    return record


def _already_imported(out_dir: str) -> Optional[dict]:
    path = os.path.join(out_dir, RESULTS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def import_archive(source: str, workdir: str, num_classes: int, image_size: int, dataset: str,
                   config=None) -> Tuple[List[dict], List[str]]:
    """Import every teacher of ``source`` (see the module docstring) into ``<workdir>/<model>/``.

    Returns (one row per teacher: model, classes, file, epoch, stored top-1, status; the files left out). A
    teacher already imported from the same bytes is kept ("done"); one imported from other bytes, or a file
    that does not import, is a failed row, and a ValueError naming the first failure follows the others' import.
    """
    from kdjax import models

    source = os.path.abspath(source)
    teachers, left_out = find_teachers(list_files(source), models.names())
    if not teachers:
        raise ValueError(f"{source} holds no <model>_vanilla/ckpt_epoch_<n>.pth of a zoo model; left out: "
                         f"{'; '.join(left_out[:5]) or 'nothing (empty)'}")
    rows = []
    tar = None if os.path.isdir(source) else tarfile.open(source)
    try:
        for teacher in teachers:
            out_dir = os.path.join(workdir, teacher.model)
            label = f"{source}:{teacher.member}" if tar else os.path.join(source, teacher.member)
            row = {"model": teacher.model, "classes": int(num_classes), "file": teacher.member,
                   "epoch": teacher.epoch, "top1": None}
            try:
                row.update(_import_member(tar, source, teacher, label, out_dir, num_classes, image_size, dataset,
                                          config))
            except (TorchCheckpointError, ValueError) as e:  # CheckpointMismatch is a ValueError
                row.update(status="failed", error=str(e).splitlines()[0])
            rows.append(row)
    finally:
        if tar is not None:
            tar.close()
    return rows, left_out


def _import_member(tar, source, teacher: Teacher, label: str, out_dir: str, num_classes, image_size, dataset,
                   config) -> dict:
    with tempfile.TemporaryDirectory(prefix="kdjax_import_") as tmp:
        if tar is None:
            path = os.path.join(source, teacher.member)
            sha256 = file_sha256(path)
        else:
            path = os.path.join(tmp, "checkpoint.pth")
            with tar.extractfile(teacher.member) as reader, open(path, "wb") as writer:
                sha256 = _copy_hashing(reader, writer)
        before = _already_imported(out_dir)
        if before is not None:
            if before.get("source_sha256") == sha256:
                return {"top1": before.get("accuracy"), "status": "done", "sha256": sha256}
            raise ValueError(f"{out_dir} holds an import of other bytes (source_sha256 "
                             f"{str(before.get('source_sha256'))[:12]}...); remove it or import into another "
                             f"--workdir")
        if os.path.exists(out_dir):  # an import that stopped before its results.json: start it afresh
            shutil.rmtree(out_dir)
        record = import_teacher(path, teacher.model, num_classes, image_size, dataset, out_dir, label, sha256,
                                config)
    return {"top1": record["accuracy"], "status": "imported", "sha256": sha256}


def format_table(rows: List[dict], left_out: List[str]) -> str:
    """The rows as an aligned text table, then the files left out. ``test top-1``: the teacher's top-1 (%) on the
    test split as ``kdjax evaluate`` computes it (``row['test_top1']``, a fraction), '-' when not evaluated."""
    header = ("model", "classes", "epoch", "stored top-1", "test top-1", "status", "file")

    def percent(value, scale):
        return "-" if value is None else f"{float(value) * scale:.2f}"

    lines = [header] + [(r["model"], str(r["classes"]), str(r["epoch"]), percent(r["top1"], 1),
                         percent(r.get("test_top1"), 100),
                         r["status"] if r["status"] != "failed" else f"FAILED: {r['error']}", r["file"])
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines]
    if left_out:
        text.append(f"left out ({len(left_out)}): " + "; ".join(left_out))
    return "\n".join(text)


def teacher_dirs(teacher_dir: str, zoo: List[str]) -> Dict[str, str]:
    """{model: workdir} of the finished teachers in ``teacher_dir`` (``<teacher_dir>/<model>/results.json``)."""
    if not os.path.isdir(teacher_dir):
        raise ValueError(f"teacher_dir={teacher_dir}: no such directory; import the teachers first with "
                         f"`kdjax import_torch --config.source=cifar_teachers.tar --workdir={teacher_dir}`")
    return {name: os.path.join(teacher_dir, name) for name in zoo
            if os.path.exists(os.path.join(teacher_dir, name, RESULTS))}


def import_and_report(config, workdir: str, evaluate_rows=None) -> List[dict]:
    """The ``import_torch`` task for an archive: import, evaluate (``evaluate_rows(rows)``, when given, sets each
    imported row's ``test_top1`` and returns a line to print, or None), print the table, and fail (after the
    others are imported) naming the first teacher that did not import."""
    rows, left_out = import_archive(config.source, workdir, int(config.num_classes), int(config.image_size),
                                    config.dataset, config)
    note = evaluate_rows(rows) if evaluate_rows is not None else None
    print(format_table(rows, left_out), flush=True)
    if note:
        print(note, flush=True)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise ValueError(f"{len(failed)} of {len(rows)} teachers did not import; first, {failed[0]['model']}: "
                         f"{failed[0]['error']}")
    print(f"[import_torch] {len(rows)} teachers in {os.path.abspath(workdir)}; give the sweep "
          f"--config.teacher_dir={workdir}", flush=True)
    return rows

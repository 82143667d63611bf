"""Task 'import_torch': convert a PyTorch teacher (the original's ``.pth``, torchvision's, or a ``.safetensors``
file) into a kdjax checkpoint (``workdir/checkpoints``), or every teacher of an archive (``cifar_teachers.tar``, a
RepDistiller ``save/models`` directory) into ``workdir/<model>/`` (``kdjax.checkpoint.archive_import``).

The dataset's mean/std go into ``meta`` so that every task can check the teacher against its config.
"""
import os

from kdjax import models
from kdjax.checkpoint import archive_import
from kdjax.tasks import frame


def check(config):
    if not config.source:
        raise ValueError("give the PyTorch file to import: --config.source=PATH.pth (or .safetensors, or a teacher "
                         "archive: cifar_teachers.tar or a directory of <model>_vanilla/ckpt_epoch_240.pth)")
    models.check_name(config.model)


def load(config, _):
    source = os.path.abspath(config.source)
    return archive_import.read_teacher(source, config.model, config.num_classes, config.image_size, config.dataset,
                                       source, archive_import.file_sha256(source))


def run_import(config, workdir, inputs):
    record = archive_import.save_teacher(workdir, *inputs)
    # The import's own record, written last by the frame: it marks the teacher as finished for its consumers.
    line = (f"[import_torch] {config.model} ({config.num_classes} classes) from {config.source} -> {workdir}"
            f" (stored accuracy: {record['accuracy']})")
    return frame.Outcome(record, line)


TASK = frame.Task("import_torch", check, load, run_import)


def run(config, workdir):
    if config.source and archive_import.is_archive(config.source):
        return archive_import.import_and_report(config, workdir)
    return frame.run_frame(TASK, config, workdir)

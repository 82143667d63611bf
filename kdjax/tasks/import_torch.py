"""Task 'import_torch': convert an original PyTorch checkpoint into a kdjax checkpoint (``workdir/checkpoints``), or
every teacher of an archive (``cifar_teachers.tar``, RepDistiller's ``save/models``) into ``workdir/<model>/``.

The dataset's mean/std go into ``meta`` so that every task can check the teacher against its config.
"""
import os

from kdjax import models
from kdjax.checkpoint import archive_import


def run(config, workdir):
    if not config.source:
        raise ValueError("give the PyTorch file to import: --config.source=PATH.pth (or .safetensors, or a teacher "
                         "archive: cifar_teachers.tar or a directory of <model>_vanilla/ckpt_epoch_240.pth)")
    if archive_import.is_archive(config.source):
        return archive_import.import_and_report(config, workdir)
    models.check_name(config.model)
    source = os.path.abspath(config.source)
    record = archive_import.import_teacher(config.source, config.model, config.num_classes, config.image_size,
                                           config.dataset, workdir, source, archive_import.file_sha256(source),
                                           config)
    print(f"[import_torch] {config.model} ({config.num_classes} classes) from {config.source} -> {workdir}"
          f" (stored accuracy: {record['accuracy']})", flush=True)
    return record

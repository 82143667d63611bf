"""Task 'import_torch': convert a PyTorch teacher (the original's ``.pth``, torchvision's, or a ``.safetensors``
file) into a kdjax checkpoint (``workdir/checkpoints``), or every teacher of an archive (``cifar_teachers.tar``, a
RepDistiller ``save/models`` directory) into ``workdir/<model>/`` (``kdjax.checkpoint.archive_import``).

The dataset's mean/std go into ``meta`` so that every task can check the teacher against its config.
"""
import os

from kdjax import models
from kdjax.checkpoint import CheckpointError, archive_import, check_against_dataset, load_checkpoint
from kdjax.data import DataNotFoundError, names as data_names, open_for, streams
from kdjax.tasks import frame
from kdjax.train import recipe as recipe_lib
from kdjax.train.evaluate import evaluate_model


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


def evaluate_teachers(config, workdir):
    """``evaluate_rows`` of the archive import: each imported teacher's top-1 on the test split of
    ``config.dataset``, computed as ``kdjax evaluate --config.checkpoint=<workdir>/<model>`` computes it, when that
    dataset is present; otherwise the rows keep '-' and the returned line says how to get it."""
    def evaluate_rows(rows):
        imported = [r for r in rows if r["status"] != "failed"]
        if not imported:
            return None
        first = os.path.join(workdir, imported[0]["model"])
        try:
            dataset = open_for(config)
        except DataNotFoundError as e:  # e.g. "cifar100 is not prepared in DIR ...: put FILE into DIR"
            return (f"test top-1 not evaluated: {str(e).splitlines()[0]}; then run this command again (the imported "
                    f"teachers are kept; --config.data_dir=DIR for another folder), or: kdjax evaluate "
                    f"--config.checkpoint={first} --workdir=DIR")
        dtype = recipe_lib.compute_dtype(config.dtype)
        for row in imported:
            path = os.path.join(workdir, row["model"])
            try:
                variables, meta, model_name = load_checkpoint(path, row["model"], field="checkpoint")
                check_against_dataset(meta, path, dataset)
            except CheckpointError as e:  # e.g. the dataset's class count is not the teachers'
                return f"test top-1 not evaluated on {config.dataset}: {str(e).splitlines()[0]}"
            out = evaluate_model(model_name, variables, dataset, dtype, int(config.eval_batch_size))
            row["test_top1"] = out["top1"]
        return f"test top-1: on the {dataset.num_test} test images of {dataset.name}"

    return evaluate_rows


def check_archive_evaluation(config):
    """What evaluating an archive's teachers needs from the config, checked before anything is imported."""
    recipe_lib.compute_dtype(config.dtype)
    if not (config.dataset in data_names() or streams(config.dataset)):
        raise ValueError(f"unknown dataset {config.dataset!r}: valid names are {', '.join(data_names())}, imagenet, "
                         f"imagenet100")


def run(config, workdir):
    if config.source and archive_import.is_archive(config.source):
        check_archive_evaluation(config)
        return archive_import.import_and_report(config, workdir, evaluate_teachers(config, workdir))
    return frame.run_frame(TASK, config, workdir)

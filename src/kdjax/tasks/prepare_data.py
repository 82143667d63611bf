"""Task 'prepare_data': the official ImageNet / ImageNet-100 archives (or an ImageFolder tree) -> verified record
shards for the streamed input path (``kdjax.data.streamed.prepare``); the workdir keeps the run's record."""
from kdjax.data.streamed.prepare import DATASETS, prepare_from_config
from kdjax.tasks import frame


def check(config):
    if config.dataset not in DATASETS:
        raise ValueError(f"prepare_data prepares {', '.join(DATASETS)}, not {config.dataset!r}: CIFAR, Tiny-ImageNet, "
                         f"SVHN and digits load into memory and need no preparation")
    if not config.manual_dir:
        raise ValueError("give the folder of the official archives: --config.manual_dir=DIR (ILSVRC2012_img_train.tar "
                         "and ILSVRC2012_img_val.tar, or train/<wnid>/ and val/<wnid>/)")


def run_prepare(config, workdir, _):
    manifest = prepare_from_config(config)
    shards = {split: len(manifest.paths(split)) for split in ("train", "test")}
    results = {"task": "prepare_data", "dataset": manifest.name, "num_classes": manifest.num_classes,
               "train": manifest.count("train"), "test": manifest.count("test"), "shards": shards,
               "path": str(manifest.root)}
    line = (f"[prepare_data] {manifest.name}: {results['train']} train / {results['test']} test images in "
            f"{shards['train'] + shards['test']} verified shards under {manifest.root}")
    return frame.Outcome(results, line)


TASK = frame.Task("prepare_data", check, lambda config, _: None, run_prepare)


def run(config, workdir):
    return frame.run_frame(TASK, config, workdir)

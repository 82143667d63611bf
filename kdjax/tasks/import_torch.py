"""Task 'import_torch': convert an original PyTorch checkpoint into a kdjax checkpoint (``workdir/checkpoints``).

The dataset's mean/std go into ``meta`` so that every task can check the teacher against its config.
"""
import os

from kdjax import models
from kdjax.checkpoint import read_torch_checkpoint, save_model, torch_to_variables
from kdjax.checkpoint.store import CHECKPOINT_SUBDIR

# Normalisation of the datasets the original teachers were trained on (SPEC section 2.0).
KNOWN_STATS = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def run(config, workdir):
    models.check_name(config.model)
    if not config.source:
        raise ValueError("give the PyTorch file to import: --config.source=PATH.pth")
    state_dict, info = read_torch_checkpoint(config.source)
    variables = torch_to_variables(state_dict, config.model, int(config.num_classes), int(config.image_size),
                                   source=config.source)
    mean, std = KNOWN_STATS.get(config.dataset, (None, None))
    meta = {"model": config.model, "num_classes": int(config.num_classes), "image_size": int(config.image_size),
            "dataset": config.dataset, "mean": mean, "std": std, "source": os.path.abspath(config.source),
            "accuracy": info.get("accuracy"), "epoch": info.get("epoch")}
    directory = save_model(os.path.join(workdir, CHECKPOINT_SUBDIR), variables, meta)
    print(f"[import_torch] {config.model} ({config.num_classes} classes) from {config.source} -> {directory}"
          f" (stored accuracy: {info.get('accuracy')})", flush=True)
    return meta

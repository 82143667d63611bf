"""Task 'import_torch': convert an original PyTorch checkpoint into a kdjax checkpoint (``workdir/checkpoints``).

The dataset's mean/std go into ``meta`` so that every task can check the teacher against its config.
"""
import os

from kdjax import models, runlog, workdir as workdir_lib
from kdjax.checkpoint import read_torch_checkpoint, save_model, torch_to_variables
from kdjax.checkpoint.store import CHECKPOINT_SUBDIR
from kdjax.data.archives import STATS


def run(config, workdir):
    workdir_lib.check_owner(workdir, "import_torch")  # never over a trained teacher's checkpoints
    models.check_name(config.model)
    if not config.source:
        raise ValueError("give the PyTorch file to import: --config.source=PATH.pth")
    state_dict, info = read_torch_checkpoint(config.source)
    variables = torch_to_variables(state_dict, config.model, int(config.num_classes), int(config.image_size),
                                   source=config.source)
    mean, std = STATS.get(config.dataset, (None, None))  # the datasets the original teachers know
    meta = {"model": config.model, "num_classes": int(config.num_classes), "image_size": int(config.image_size),
            "dataset": config.dataset, "mean": mean, "std": std, "source": os.path.abspath(config.source),
            "accuracy": info.get("accuracy"), "epoch": info.get("epoch")}
    directory = save_model(os.path.join(workdir, CHECKPOINT_SUBDIR), variables, meta)
    # The import's own record, written last: it marks the teacher as finished for the runs that consume it.
    runlog.write_results(workdir, {"task": "import_torch", **meta}, config)
    print(f"[import_torch] {config.model} ({config.num_classes} classes) from {config.source} -> {directory}"
          f" (stored accuracy: {info.get('accuracy')})", flush=True)
    return meta

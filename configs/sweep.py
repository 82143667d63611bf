"""The paper's grid: teacher/student pairs x schemes x seeds, the T. stddev runs, and the report.

    python launch.py --config=configs/sweep.py --workdir=runs/paper
    python launch.py --config=configs/sweep.py:pairs=resnet56:resnet20,augs=cutmix+cutmix_pick_t,seeds=0 \
        --config.teacher_checkpoints=resnet56=runs/t_resnet56 --workdir=runs/small

Lists use '+' inside the colon argument. ``datasets`` entries ending in '?' are used only when their data is present
(the default adds Tiny-ImageNet that way). Teachers not given in ``teacher_checkpoints`` are trained first.
"""
from kdjax.config_defaults import RUN_FIELDS
from kdjax.config_util import parse_arg
from kdjax.sweep import PAPER_PAIRS


def get_config(arg=None):
    run_fields = {k: RUN_FIELDS[k] for k in ("batch_size", "dtype", "image_size", "data_dir", "manual_dir",
                                             "dataset_options", "steps_per_dispatch", "last_batch", "eval_every",
                                             "epoch_factor")}
    return parse_arg(arg, task="sweep", pairs="+".join(PAPER_PAIRS), augs="all", seeds="0+1+2",
                     datasets="cifar100+tiny_imagenet?", teacher_checkpoints="", epochs=240, teacher_epochs=240,
                     tstddev_epochs=10, parallel=1, report=True, **run_fields)

"""Evaluate any kdjax checkpoint on the test split: test loss, top-1, top-5.

    python launch.py --config=configs/evaluate.py:dataset=cifar100 --config.checkpoint=runs/t_resnet56 --workdir=runs/eval
"""
from kdjax.config_defaults import RUN_FIELDS
from kdjax.config_util import parse_arg


def get_config(arg=None):
    fields = {k: RUN_FIELDS[k] for k in ("dataset", "image_size", "data_dir", "manual_dir", "eval_batch_size", "dtype",
                                          "dataset_options")}
    return parse_arg(arg, task="evaluate", checkpoint="", model="", **fields)

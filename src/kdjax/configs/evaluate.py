"""Evaluate any kdjax checkpoint on the test split: test loss, top-1, top-5.

    kdjax evaluate --config.dataset=cifar100 --config.checkpoint=runs/t_resnet56 --workdir=runs/eval
"""
import ml_collections
from ml_collections import config_dict

from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    config = ml_collections.ConfigDict(dict(
        task="evaluate", checkpoint=config_dict.placeholder(str), model=config_dict.placeholder(str),
        **fields.run_fields(*fields.DATA_FIELDS, "eval_batch_size", "dtype")))
    config.dataset_options = fields.dataset_options()
    return apply_arg(fields.from_checkpoint(config), arg)

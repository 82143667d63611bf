"""Import a checkpoint of the original PyTorch code (e.g. CRD's ckpt_epoch_240.pth) into kdjax's format.

A copy to edit: ``kdjax --config=configs/import_torch.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax import_torch --help``.
"""
from kdjax.configs.import_torch import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

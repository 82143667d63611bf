"""Import a checkpoint of the original PyTorch code (e.g. CRD's ckpt_epoch_240.pth) into kdjax's format.

    kdjax import_torch --config.model=resnet56 --config.num_classes=100 \
        --config.source=save/models/resnet56_vanilla/ckpt_epoch_240.pth --workdir=runs/t_resnet56
"""
import ml_collections
from ml_collections import config_dict

from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    return apply_arg(ml_collections.ConfigDict(dict(
        task="import_torch", model="resnet56", num_classes=100, image_size=32, source=config_dict.placeholder(str),
        dataset="cifar100")), arg)

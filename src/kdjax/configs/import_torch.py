"""Import a checkpoint of the original PyTorch code (e.g. CRD's ckpt_epoch_240.pth) into kdjax's format.

    kdjax import_torch --config.model=resnet56 --config.num_classes=100 \
        --config.source=save/models/resnet56_vanilla/ckpt_epoch_240.pth --workdir=runs/t_resnet56
    kdjax import_torch --config.source=cifar_teachers.tar --workdir=runs/teachers   # every teacher of an archive

An archive's table shows each teacher's top-1 on the test split of ``dataset`` (under ``data_dir``) when that
dataset is present, evaluated as ``kdjax evaluate`` does (``eval_batch_size``, ``dtype``).
"""
import ml_collections
from ml_collections import config_dict

from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    config = ml_collections.ConfigDict(dict(
        task="import_torch", model="resnet56", num_classes=100, source=config_dict.placeholder(str),
        **fields.run_fields("data_dir", "manual_dir", "eval_batch_size", "dtype"), dataset="cifar100",
        image_size=32))
    config.dataset_options = fields.dataset_options()
    return apply_arg(config, arg)

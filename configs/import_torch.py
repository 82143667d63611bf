"""Import a checkpoint of the original PyTorch code (e.g. CRD's ckpt_epoch_240.pth) into kdjax's format.

    python launch.py --config=configs/import_torch.py:model=resnet56 --config.num_classes=100 \
        --config.source=save/models/resnet56_vanilla/ckpt_epoch_240.pth --workdir=runs/t_resnet56
"""
from kdjax.config_util import parse_arg


def get_config(arg=None):
    return parse_arg(arg, task="import_torch", model="resnet56", num_classes=100, image_size=32, source="",
                     dataset="cifar100")

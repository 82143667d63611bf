"""A PNG grid of every augmentation scheme applied to real images (a visual check of kdjax.augment).

A copy to edit: ``kdjax --config=configs/augment_gallery.py[:field=value,...] --workdir=DIR`` runs it. The defaults and the
meaning of every field: ``kdjax augment_gallery --help``.
"""
from kdjax.configs.augment_gallery import get_config as package_config


def get_config(arg=None):
    config = package_config(arg)
    # Change defaults here, e.g. config.epochs = 10
    return config

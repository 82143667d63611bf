"""A PNG grid of every augmentation scheme applied to real images (a visual check of kdjax.augment).

    kdjax augment_gallery --workdir=runs/gallery
    kdjax augment_gallery --config.dataset=cifar100 --config.per_sample=true --workdir=runs/gallery
    kdjax augment_gallery --config.aug=cutout,cutmix --config.num_images=4 --workdir=runs/gallery

Rows: the original images, the base crop+flip batch x, then x' = A(x) for each scheme in ``aug``.
"""
import ml_collections

from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    config = ml_collections.ConfigDict(dict(
        task="augment_gallery", seed=0, aug=("all",), num_images=8, per_sample=False,
        output="augment_gallery.png", **fields.run_fields(*fields.DATA_FIELDS)))
    config.dataset = "digits"
    config.dataset_options = fields.dataset_options()
    return apply_arg(config, arg)

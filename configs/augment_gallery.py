"""A PNG grid of every augmentation scheme applied to real images (a visual check of kdjax.augment).

    python launch.py --config=configs/augment_gallery.py --workdir=runs/gallery
    python launch.py --config=configs/augment_gallery.py:dataset=cifar100,per_sample=True --workdir=runs/gallery
    python launch.py --config=configs/augment_gallery.py:aug=cutout+cutmix,num_images=4 --workdir=runs/gallery

Rows: the original images, the base crop+flip batch x, then x' = A(x) for each scheme in ``aug``.
"""
from kdjax.config_util import parse_arg


def get_config(arg=None):
    return parse_arg(
        arg,
        task="augment_gallery",
        dataset="digits",    # any kdjax.data source; cifar100 / tiny_imagenet where prepared
        seed=0,
        aug="all",           # 'all' = the nine schemes in the paper's order, or a list: aug=cutout+mixup
        num_images=8,        # columns; also the batch the schemes see
        per_sample=False,    # True: each image gets its own draw (the original draws once per batch)
        image_size=0,        # 0: the dataset's own size (digits: 32)
        data_dir="",
        manual_dir="",
        dataset_options="",
        output="augment_gallery.png",
    )

"""Prepare a streamed dataset once: ``kdjax prepare_data --config.dataset=imagenet --config.manual_dir=DIR``.

Turns the official ``ILSVRC2012_img_train.tar`` / ``ILSVRC2012_img_val.tar`` (or an ImageFolder tree ``train/<wnid>``,
``val/<wnid>``) in ``manual_dir`` into verified ArrayRecord shards with a manifest under ``data_dir``
(docs/streamed_data.md). Resumes after a kill; a truncated archive, a missing class or an unreadable image is one
line naming it.
"""
import ml_collections
from ml_collections import config_dict

from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    return apply_arg(ml_collections.ConfigDict(dict(
        task="prepare_data",
        dataset="imagenet",
        classes=config_dict.placeholder(tuple),
        workers=config_dict.placeholder(int),
        records_per_shard=config_dict.placeholder(int),
        **fields.run_fields("data_dir", "manual_dir"),
    )), arg)

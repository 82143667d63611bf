"""Data augmentation on the accelerator: the base training transform and the paper's nine schemes.

``create(aug, dataset_stats=..., **options)`` returns ``fn(key, images, labels, score_fn=None) -> (images_aug,
aux)`` on normalised float NHWC batches; ``names()`` lists the schemes, ``register(name, factory)`` adds one.
``base`` holds the loader's per-sample crop+flip and the uint8 <-> normalised conversions; ``entropy`` and
``kld_score`` are the CutMixPick scores for step builders.
"""
from kdjax.augment import base
from kdjax.augment.base import base_train_transform, denormalize, normalize, renormalize, to_uint8_truncating
from kdjax.augment.registry import (CRITERIA, POLICIES, SCORERS, Scheme, as_stats, check_name, create, names,
                                    register)
from kdjax.augment.schemes import DatasetStats, Options, derangement
from kdjax.augment.scoring import entropy, kld_score

__all__ = ["CRITERIA", "DatasetStats", "Options", "POLICIES", "SCORERS", "Scheme", "as_stats", "base",
           "base_train_transform", "check_name", "create", "denormalize", "derangement", "entropy", "kld_score",
           "names", "normalize", "register", "renormalize", "to_uint8_truncating"]

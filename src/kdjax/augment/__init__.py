"""Data augmentation on the accelerator: the base training transform and the paper's nine schemes.

``create(aug, dataset_stats=..., **options)`` returns ``fn(key, images, labels, score_fn=None) -> (images_aug,
aux)`` on normalised float NHWC batches; ``names()`` lists the schemes (``PAPER_SCHEMES`` the paper's nine, in
its order), ``register(name, factory)`` adds one. ``transforms`` holds what every batch goes through before a
scheme (the loader's per-sample crop+flip and normalisation), the uint8 <-> normalised conversions and the
scheme's label targets.
"""
from kdjax.augment import schemes, transforms  # noqa: F401  (schemes registers the built-in schemes)
from kdjax.augment.registry import (CRITERIA, PAPER_SCHEMES, POLICIES, SCORERS, DatasetStats, Options, Scheme,
                                    as_stats, check_name, config_block, create, label, names, option_help,
                                    option_names, options_from_config, register, scorer_of)
from kdjax.augment.schemes import derangement
from kdjax.augment.transforms import (base_train_batch, base_train_transform, denormalize, mixed_targets, normalize,
                                      to_uint8_truncating)
from kdjax.losses import entropy

__all__ = ["CRITERIA", "DatasetStats", "Options", "PAPER_SCHEMES", "POLICIES", "SCORERS", "Scheme", "as_stats",
           "base_train_batch", "base_train_transform", "check_name", "config_block", "create", "denormalize",
           "derangement", "entropy", "label", "mixed_targets", "names", "normalize", "option_help", "option_names",
           "options_from_config", "register", "scorer_of", "to_uint8_truncating", "transforms"]

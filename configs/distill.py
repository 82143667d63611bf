"""Train a student by KD with one augmentation scheme (the paper's S. test loss runs, SPEC sections 0 and 3).

    python launch.py --config=configs/distill.py:teacher=resnet56,student=resnet20,aug=cutmix_pick_t \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/kd_r56_r20_cmp_t

``teacher=none`` trains the student on labels only (cross-entropy on x and x'), the paper's KD-versus-CE baseline.
"""
import ml_collections
from ml_collections import config_dict

from kdjax.config_defaults import RUN_FIELDS, optim_config
from kdjax.config_util import parse_arg


def get_config(arg=None):
    config = parse_arg(arg, task="distill", teacher="resnet56", student="resnet20", aug="identity",
                       distiller="kd", teacher_checkpoint="", **RUN_FIELDS)
    config.optim = optim_config()
    config.loss = ml_collections.ConfigDict(dict(
        gamma=config_dict.placeholder(float),  # CE weight: 0.1 for KD (the paper); distillers set their own
        alpha=config_dict.placeholder(float),  # weight of the KL block: 0.9 for KD
        beta=config_dict.placeholder(float),   # weight of the feature distiller's loss
        temperature=4.0,
        lw_mix=(1.0, 0.0, 1.0),  # KL on x, mixed-label CE on x', KL on x'
    ))
    config.augment = ml_collections.ConfigDict(dict(
        per_sample=False,  # the original draws the scheme's randomness once per batch
        mix_n_run=2,       # CutMix draws pooled by CutMixPick
        n_pick=config_dict.placeholder(int),  # None: the batch size, capped at the pool size
        criterion="entropy",  # CutMixPick score: 'entropy' (the paper) or 'kld'
    ))
    return config

"""Train a student by KD with one augmentation scheme (the paper's S. test loss runs, SPEC sections 0 and 3).

    python launch.py --config=configs/distill.py:teacher=resnet56,student=resnet20,aug=cutmix_pick_t \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/kd_r56_r20_cmp_t

``teacher=none`` trains the student on labels only (cross-entropy on x and x'), the paper's KD-versus-CE baseline.
``distiller=crd`` (or hint, at, sp, pkt, rkd, vid) adds a feature distiller's loss beside KD; its options are under
``--config.distill.*`` and its weights default to the method's (``--config.loss.beta`` etc. override them).
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
    # Options of the feature distiller (distiller=crd|hint|at|sp|pkt|rkd|vid); None keeps the method's default.
    # Setting one that the chosen distiller does not have is an error that lists the valid ones.
    config.distill = ml_collections.ConfigDict(dict(
        with_kd=config_dict.placeholder(bool),      # the "+KD" variant (e.g. CRD+KD): alpha 1 under identity
        feat_dim=config_dict.placeholder(int),      # crd: embedding size (128)
        nce_k=config_dict.placeholder(int),         # crd: negatives per anchor (16384), drawn with replacement
        nce_t=config_dict.placeholder(float),       # crd: temperature (0.07)
        nce_m=config_dict.placeholder(float),       # crd: memory-bank momentum (0.5)
        hint_layer=config_dict.placeholder(int),    # hint: feature index (2)
        p=config_dict.placeholder(float),           # at: exponent of the attention map (2)
        w_d=config_dict.placeholder(float),         # rkd: distance weight (25)
        w_a=config_dict.placeholder(float),         # rkd: angle weight (50)
        init_pred_var=config_dict.placeholder(float),  # vid: initial predicted variance (5)
        eps=config_dict.placeholder(float),         # pkt / vid: numerical epsilon
    ))
    config.augment = ml_collections.ConfigDict(dict(
        per_sample=False,  # the original draws the scheme's randomness once per batch
        mix_n_run=2,       # CutMix draws pooled by CutMixPick
        n_pick=config_dict.placeholder(int),  # None: the batch size, capped at the pool size
        criterion="entropy",  # CutMixPick score: 'entropy' (the paper) or 'kld'
    ))
    return config

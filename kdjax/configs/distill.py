"""Train a student by KD with one augmentation scheme (the paper's S. test loss runs).

    kdjax distill --config.teacher=resnet56 --config.student=resnet20 --config.aug=cutmix_pick_t \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/kd_r56_r20_cmp_t

``teacher=none`` trains the student on labels only (cross-entropy on x and x'), the paper's KD-versus-CE baseline.
``distiller=crd`` (or hint, at, sp, pkt, rkd, vid) adds a feature distiller's loss beside KD; its options are under
``--config.distill.*`` and its weights default to the method's (``--config.loss.beta`` etc. override them).
"""
import ml_collections
from ml_collections import config_dict

from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    config = fields.training_config("distill", teacher="resnet56", student="resnet20", aug="identity",
                                    distiller="kd", teacher_checkpoint=config_dict.placeholder(str))
    config.loss = ml_collections.ConfigDict(dict(
        gamma=config_dict.placeholder(float),
        alpha=config_dict.placeholder(float),
        beta=config_dict.placeholder(float),
        temperature=4.0,
        lw_mix=(1.0, 0.0, 1.0),
    ))
    # Setting an option that the chosen distiller does not have is an error that lists the valid ones.
    config.distill = ml_collections.ConfigDict(dict(
        with_kd=config_dict.placeholder(bool),
        feat_dim=config_dict.placeholder(int),
        nce_k=config_dict.placeholder(int),
        nce_t=config_dict.placeholder(float),
        nce_m=config_dict.placeholder(float),
        hint_layer=config_dict.placeholder(int),
        p=config_dict.placeholder(float),
        w_d=config_dict.placeholder(float),
        w_a=config_dict.placeholder(float),
        init_pred_var=config_dict.placeholder(float),
        eps=config_dict.placeholder(float),
    ))
    config.augment = ml_collections.ConfigDict(dict(
        per_sample=False,
        mix_n_run=2,
        n_pick=config_dict.placeholder(int),
        criterion="entropy",
    ))
    return apply_arg(fields.from_checkpoint(config), arg)

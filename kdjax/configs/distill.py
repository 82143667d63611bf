"""Train a student by KD with one augmentation scheme (the paper's S. test loss runs).

    kdjax distill --config.teacher=resnet56 --config.student=resnet20 --config.aug=cutmix_pick_t \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/kd_r56_r20_cmp_t

``teacher=none`` trains the student on labels only (cross-entropy on x and x'), the paper's KD-versus-CE baseline.
``distiller=crd`` (or hint, at, sp, pkt, rkd, vid, nst, kdsvd, cc, ft) adds a feature distiller's loss beside KD;
``distiller=ab``, ``ft`` and ``fsp`` first train an init stage (``distill.init_epochs``, in ``<workdir>/init_stage``);
``distiller=dkd`` (or dist, nkd, wttm) replaces KD's KL terms on x and x' by that logit loss. Their options are under
``--config.distill.*`` and their weights default to the method's (``--config.loss.beta`` etc. override them).
``--config.loss.logit_stand=true`` z-scores the logits of the kd or dkd terms (logit standardisation, CVPR'24).
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
        # logit standardisation: the kd/dkd terms on z-scored logits at ls_temperature (the official base
        # temperature 2) with its weight (alpha 9 unless set); CE and the CutMixPick 'kld' score keep temperature
        logit_stand=False,
        ls_temperature=2.0,
        # 'entropy': each sample's kd / dkd term weighted by EA-KD's teacher/student entropy weight
        sample_weights="none",
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
        k=config_dict.placeholder(int),             # kdsvd: singular vectors kept per layer (1)
        svd_signs=config_dict.placeholder(str),     # kdsvd: teacher vector signs, original (the SVD's) or aligned
        dkd_alpha=config_dict.placeholder(float),   # dkd: weight of TCKD (the paper's alpha, 1)
        dkd_beta=config_dict.placeholder(float),    # dkd: weight of NCKD (the paper's beta, 8)
        warmup=config_dict.placeholder(int),        # dkd: epochs over which its loss ramps in (20; 0: none)
        dist_beta=config_dict.placeholder(float),   # dist: inter-class relation weight (1)
        dist_gamma=config_dict.placeholder(float),  # dist: intra-class relation weight (1)
        nkd_temp=config_dict.placeholder(float),    # nkd: temperature of the non-target term (3)
        nkd_gamma=config_dict.placeholder(float),   # nkd: weight of the non-target term (3.5)
        ttm_l=config_dict.placeholder(float),       # wttm: power of the teacher's probabilities (0.2)
        init_epochs=config_dict.placeholder(int),   # ab / ft / fsp: epochs of the init stage (30; 0: none)
        init_lr=config_dict.placeholder(float),     # ab / ft / fsp: the init stage's constant lr (the original's rule)
        margin=config_dict.placeholder(float),      # ab: activation-boundary margin (1)
        ft_k=config_dict.placeholder(float),        # ft: the paraphraser's factor rate k (0.5)
    ))
    config.augment = ml_collections.ConfigDict(dict(
        per_sample=False,
        mix_n_run=2,
        n_pick=config_dict.placeholder(int),
        criterion="entropy",
    ))
    return apply_arg(fields.from_checkpoint(config), arg)

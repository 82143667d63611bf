"""Train a student by KD with one augmentation scheme (the paper's S. test loss runs).

    kdjax distill --config.teacher=resnet56 --config.student=resnet20 --config.aug=cutmix_pick_t \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/kd_r56_r20_cmp_t

``teacher=none`` trains the student on labels only (cross-entropy on x and x'), the paper's KD-versus-CE baseline.
``distiller=crd`` (or hint, at, sp, pkt, rkd, vid, nst, kdsvd, cc, ft) adds a feature distiller's loss beside KD;
``distiller=ab``, ``ft`` and ``fsp`` first train an init stage (``distill.init_epochs``, in ``<workdir>/init_stage``);
``distiller=dkd`` (or dist, nkd, wttm) replaces KD's KL terms on x and x' by that logit loss. Their options are under
``--config.distill.*`` and their weights default to the method's (``--config.loss.beta`` etc. override them).
``--config.loss.logit_stand=true`` z-scores the logits of the kd or dkd terms (logit standardisation, CVPR'24).
``--config.ctkd.mode=global`` learns the temperature of the kd or dkd terms (CTKD, AAAI'23).
"""
import ml_collections
from ml_collections import config_dict

from kdjax import augment, distillers
from kdjax.distillers import ctkd
from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    config = fields.training_config("distill", teacher=config_dict.placeholder(str), student="resnet20", aug="identity",
                                    distiller="kd", teacher_checkpoint=config_dict.placeholder(str),
                                    scheme_switch=config_dict.placeholder(bool))
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
        sample_weights=config_dict.placeholder(str),
    ))
    # Every option a registered distiller declares (kdjax.distillers.option), unset: the method's own default.
    # Setting an option that the chosen distiller does not have is an error that lists the valid ones.
    config.distill = ml_collections.ConfigDict({name: config_dict.placeholder(opt.type)
                                                for name, opt in distillers.options().items()})
    config.augment = augment.config_block()
    # CTKD's learned temperature of the logit terms (--config.ctkd.mode=global); its options are declared on
    # kdjax.distillers.ctkd.CurriculumTemperature
    config.ctkd = ctkd.config_block()
    return apply_arg(fields.from_checkpoint(config), arg)

"""T. stddev of a teacher under the nine augmentation schemes (the original's --utils.check_ce_var run, SPEC section 1).

    python launch.py --config=configs/tstddev.py:teacher=resnet56,dataset=cifar100,aug=all \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/tstd_resnet56

``aug=all`` runs the nine schemes in one program (common random numbers: the same base batches for all) and writes
``<workdir>/<aug>/results.json`` per scheme plus ``<workdir>/tstddev.md``; a single scheme writes
``<workdir>/results.json``. CutMixPick (S. ent.) needs a trained student: ``--config.student_checkpoint=DIR`` (and
``student=<model>`` when its checkpoint does not say); without one, ``aug=all`` skips that scheme with a warning and
``aug=cutmix_pick_s`` stops with an error.
"""
import ml_collections
from ml_collections import config_dict

from kdjax.config_util import parse_arg


def get_config(arg=None):
    config = parse_arg(
        arg, task="tstddev", teacher="resnet56", dataset="cifar100", aug="all", teacher_checkpoint="",
        student="",              # model of student_checkpoint; empty: read from the checkpoint's meta
        student_checkpoint="",   # required for cutmix_pick_s (scores by the fixed student's entropy)
        epochs=10, batch_size=64, seed=0,
        dtype="float32",         # teacher compute: float32 (exact, Precision.HIGHEST) or bfloat16
        steps_per_dispatch=200,  # steps per compiled dispatch (balanced over the epoch)
        steps_per_forward=8,     # consecutive steps whose batches go through the teacher together
        image_size=0, data_dir="", manual_dir="", dataset_options="")
    config.augment = ml_collections.ConfigDict(dict(
        per_sample=False,  # the original draws the scheme's randomness once per batch
        mix_n_run=2,       # CutMix draws pooled by CutMixPick
        n_pick=config_dict.placeholder(int),  # None: the batch size (32 on CIFAR's short batch of 16)
    ))
    return config

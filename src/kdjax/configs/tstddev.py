"""T. stddev of a teacher under the nine augmentation schemes (the original's --utils.check_ce_var run).

    kdjax tstddev --config.teacher=resnet56 --config.dataset=cifar100 --config.aug=all \
        --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/tstd_resnet56

``aug=all`` runs the nine schemes in one program (common random numbers: the same base batches for all) and writes
``<workdir>/<aug>/results.json`` per scheme plus ``<workdir>/tstddev.md``; a single scheme writes
``<workdir>/results.json``. CutMixPick (S. ent.) needs a trained student: ``--config.student_checkpoint=DIR`` (and
``student=<model>`` when its checkpoint does not say); without one, ``aug=all`` skips that scheme with a note and
``aug=cutmix_pick_s`` stops with an error.
"""
import ml_collections
from ml_collections import config_dict

from kdjax import augment
from kdjax.configs import fields
from kdjax.configs.parse import apply_arg


def get_config(arg=None):
    config = ml_collections.ConfigDict(dict(
        task="tstddev", teacher=config_dict.placeholder(str), aug="all", teacher_checkpoint=config_dict.placeholder(str),
        student=config_dict.placeholder(str), student_checkpoint=config_dict.placeholder(str),
        epochs=10, batch_size=64, seed=0, dtype="float32", steps_per_dispatch=200, steps_per_forward=8,
        **fields.run_fields(*fields.DATA_FIELDS, "compile_cache_dir")))
    config.dataset_options = fields.dataset_options()
    # T. stddev scores CutMixPick by entropy, the paper's criterion: no augment.criterion here
    config.augment = augment.config_block(exclude=("criterion",))
    config.verbose = False
    config.note_skipped = True
    return apply_arg(fields.from_checkpoint(config), arg)

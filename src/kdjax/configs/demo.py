"""The whole paper in a few minutes on the embedded digits data (no download): train a teacher, T. stddev of the
nine schemes, a KD student per scheme, then the report with its correlation table and scatter plot.

    kdjax demo --workdir=runs/demo

Small on purpose (16x16 digits, resnet14 -> resnet8, few epochs, one seed): the correlation it shows is
illustrative, not a reproduction of the paper's numbers (use `kdjax sweep` on CIFAR-100 for that).
"""
from kdjax.configs.parse import apply_arg
from kdjax.configs.sweep import sweep_config


def get_config(arg=None):
    config = sweep_config(pairs=("resnet14:resnet8",), seeds=(0,), datasets=("digits",), optional_datasets=(),
                          epochs=10, teacher_epochs=12, image_size=16, steps_per_dispatch=100, last_batch="drop",
                          eval_every=1)
    return apply_arg(config, arg)

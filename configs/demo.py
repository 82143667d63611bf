"""The whole paper in a few minutes on the embedded digits data (no download): train a teacher, T. stddev of the
nine schemes, a KD student per scheme, then the report with its correlation table and scatter plot.

    python launch.py --config=configs/demo.py --workdir=runs/demo

Small on purpose (16x16 digits, resnet14 -> resnet8, few epochs, one seed): the correlation it shows is
illustrative, not a reproduction of the paper's numbers (use configs/sweep.py on CIFAR-100 for that).
"""
from kdjax.config_defaults import RUN_FIELDS
from kdjax.config_util import parse_arg


def get_config(arg=None):
    run_fields = {k: RUN_FIELDS[k] for k in ("batch_size", "dtype", "data_dir", "manual_dir", "dataset_options",
                                             "epoch_factor")}
    return parse_arg(arg, task="sweep", pairs="resnet14:resnet8", augs="all", seeds="0", datasets="digits",
                     teacher_checkpoints="", epochs=10, teacher_epochs=12, tstddev_epochs=10, parallel=1,
                     report=True, image_size=16, steps_per_dispatch=100, last_batch="drop", eval_every=100,
                     **run_fields)

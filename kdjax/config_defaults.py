"""Fields shared by the training configs (configs/teacher.py, configs/distill.py): the paper's recipe."""
import ml_collections
from ml_collections import config_dict

# Top-level run fields with their defaults (DESIGN "Conventions").
RUN_FIELDS = dict(
    dataset="cifar100",
    epochs=240,
    epoch_factor=1,       # the original's --epoch_factor: epochs and decay milestones x k (k=4: 960 epochs)
    batch_size=64,
    seed=0,
    eval_every=1,         # epochs between test evaluations (the last epoch is always evaluated)
    checkpoint_every=10,  # epochs between checkpoints (the last epoch is always saved)
    keep_checkpoints=2,
    steps_per_dispatch=100,  # train steps per lax.scan dispatch (rounded to a divisor of the steps per epoch)
    last_batch="keep",    # 'keep': the original's short last batch (drop_last=False); 'drop'
    dtype="float32",      # compute dtype: float32 or bfloat16 (parameters and BN statistics stay float32)
    image_size=0,         # 0: the dataset's own size (digits can be rescaled to any size)
    data_dir="",          # TFDS data_dir (default ~/tensorflow_datasets or $KDJAX_DATA_DIR)
    manual_dir="",        # where the official archives are put for offline preparation
    eval_batch_size=500,
    dataset_options="",   # extra source arguments "k=v;k=v", e.g. "num_train=640;num_classes=10" for synthetic
)


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=config_dict.placeholder(float),  # None: 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2
        momentum=0.9,
        weight_decay=5e-4,
        decay_epochs=(150, 180, 210),
        decay_rate=0.1,
    ))


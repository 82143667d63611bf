"""The ImageNet KD recipes: ResNet34 -> ResNet18 and ResNet50 -> MobileNetV1, as ``distill`` configs.

    kdjax --config=configs/imagenet_kd.py:r34_r18,distiller=dkd,aug=cutmix \
        --config.teacher_checkpoint=teachers/resnet34 --workdir=runs/in1k_r34_r18_dkd

The first item of the colon argument picks the pair (``r34_r18``, the default, or ``r50_mv1``); the others are
fields of the distill config, as for every config file; the recipe is applied for the ``distiller`` given there
(kd, dkd or crd: their published settings); another distiller gets the schedule with its own loss defaults. The
paper's nine schemes (``aug``) apply on top of every one.

Where the numbers come from. The original (Good-DA-in-KD) has ImageNet in its ``--dataset`` choices and the
torchvision ResNet34 as its preset teacher, but no ImageNet values of its own: ``option.py`` keeps the CIFAR
defaults (240 epochs, lr 0.05, batch 64, weight decay 5e-4) unless the command line says otherwise, and its
scripts are CIFAR-100/Tiny ImageNet only. The recipe is therefore the standard torchvision one as the KD papers use
it, in mdistiller's configs (``configs/imagenet/r34_r18/*.yaml``, ``r50_mv1/*.yaml``), which reproduce CRD's and
DKD's tables: SGD momentum 0.9, weight decay 1e-4, 100 epochs, lr x0.1 at epochs 30, 60, 90; batch 512 with lr 0.2
(KD, DKD), batch 256 with lr 0.1 (CRD). KD: T = 1, CE and KL weighted 0.5 each. DKD:
T = 1, CE 1, alpha 1, beta 0.5 (R34 -> R18) or 2 (R50 -> MV1), warm-up 1 epoch. CRD: CE 1, no KL, contrastive
term 0.8, 16384 negatives (the CRD defaults). Training images: RandomResizedCrop(224) + flip in both; test:
resize 256, centre crop 224.
"""
from kdjax.configs import distill
from kdjax.configs.parse import ConfigError, apply_arg

PAIRS = {"r34_r18": ("resnet34_imagenet", "resnet18_imagenet"),
         "r50_mv1": ("resnet50_imagenet", "mobilenetv1_imagenet")}
DEFAULT_PAIR = "r34_r18"
# shared by every distiller: the torchvision schedule
SCHEDULE = dict(epochs=100, decay_epochs=(30, 60, 90), decay_rate=0.1, weight_decay=1e-4, momentum=0.9)
# per distiller: batch, lr and the loss (gamma = CE weight, alpha = weight of the KL term or of the logit
# distiller that replaces it, beta = a feature distiller's own term). Another distiller takes the KD batch and lr
# and keeps its own loss defaults.
METHODS = {
    "kd": dict(batch_size=512, lr=0.2, loss=dict(temperature=1.0, gamma=0.5, alpha=0.5, beta=0.0)),
    "dkd": dict(batch_size=512, lr=0.2, loss=dict(temperature=1.0, gamma=1.0, alpha=1.0, beta=0.0),
                distill=dict(dkd_alpha=1.0, dkd_beta={"r34_r18": 0.5, "r50_mv1": 2.0}, warmup=1)),
    "crd": dict(batch_size=256, lr=0.1, loss=dict(gamma=1.0, alpha=0.0, beta=0.8), distill=dict(nce_k=16384)),
}
OTHER_METHODS = dict(batch_size=512, lr=0.2)
# published top-1 (%) of the recipes, for the README: torchvision's teachers and plain students, the KD papers'
# tables (KD 70.66, CRD 71.17: CRD's; DKD: the DKD paper's) and mdistiller's README (its KD)
PUBLISHED = {"r34_r18": {"teacher": 73.31, "student": 69.76, "kd": 70.66, "kd_mdistiller": 71.03, "dkd": 71.70,
                         "crd": 71.17},
             "r50_mv1": {"teacher": 76.13, "kd_mdistiller": 70.50, "dkd": 72.05}}


def split_pair(arg):
    """(pair, the rest of the colon argument): a first item without '=' names the pair."""
    items = [s for s in (arg or "").split(",") if s.strip()]
    if items and "=" not in items[0]:
        pair = items[0].strip()
        if pair not in PAIRS:
            raise ConfigError(f"unknown ImageNet pair {pair!r}; choose one of {', '.join(PAIRS)}")
        return pair, ",".join(items[1:])
    return DEFAULT_PAIR, ",".join(items)


def get_config(arg=None):
    pair, rest = split_pair(arg)
    config = apply_arg(distill.get_config(), rest)  # the user's fields first: the recipe follows their distiller
    recipe = METHODS.get(config.distiller, OTHER_METHODS)
    teacher, student = PAIRS[pair]
    given = {item.split("=", 1)[0].strip() for item in rest.split(",") if "=" in item}
    defaults = dict(teacher=teacher, student=student, dataset="imagenet", image_size=224, aug="identity",
                    batch_size=recipe["batch_size"], epochs=SCHEDULE["epochs"], eval_batch_size=128)
    for key, value in defaults.items():
        if key not in given:
            config[key] = value
    config.optim.lr = recipe["lr"]
    for key in ("decay_epochs", "decay_rate", "weight_decay", "momentum"):
        config.optim[key] = SCHEDULE[key]
    for key, value in recipe.get("loss", {}).items():
        config.loss[key] = value
    for key, value in recipe.get("distill", {}).items():
        config.distill[key] = value[pair] if isinstance(value, dict) else value
    return config

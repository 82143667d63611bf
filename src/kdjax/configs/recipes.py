"""The official per-pair hyper-parameters of the distillers, as data.

A distiller's dataclass defaults are its official *default* recipe (DKD's beta 8, mdistiller/engine/cfg.py). Some
official repositories change a value for particular teacher/student pairs; ``RECIPES`` holds those changes, keyed
by (distiller, teacher, student) with kdjax's model names, each citing the repository and file it comes from. All
entries are the CIFAR-100 recipes (the only dataset these repositories tune per pair for kdjax's models).

``recipe_for`` gives the options of a run's pair; ``with_recipe`` lays the options a config sets over them (a
config value always wins, field by field); ``applied`` and ``describe`` are what a run records and prints.
"""
from typing import Dict, Mapping, NamedTuple, Optional, Tuple


class Entry(NamedTuple):
    options: Mapping[str, float]
    source: str  # repository and file(s) the values were read from


MDISTILLER = "megvii-research/mdistiller"
LS_REPO = "sunshangquan/logit-standardization-KD"


REVIEWKD_REPO = "dvlab-research/ReviewKD"


def _reviewkd(weight: float, also: str = "") -> Entry:
    """A ReviewKD pair of the official script (``--kd-loss-weight``, the weight of its term: kdjax's loss weight
    ``beta``, which a config overrides with ``loss.beta``); its warm-up (20 epochs) is the train.py default."""
    return Entry({"beta": weight}, f"{REVIEWKD_REPO} CIFAR-100/script/reviewKD.sh" + (f"; {also}" if also else ""))


def _dkd(beta: float, mdistiller_file: str, ls_file: str) -> Entry:
    """A DKD pair whose config sets ``DKD.BETA``; the logit-standardisation repository repeats mdistiller's
    config (its tools/train.py multiplies alpha and beta by --kd-weight for LS-DKD, which kdjax's loss.logit_stand
    does through the loss weight, so the same beta serves both)."""
    return Entry({"dkd_beta": beta}, f"{MDISTILLER} configs/cifar100/dkd/{mdistiller_file}; "
                                     f"{LS_REPO} configs/cifar100/dkd/{ls_file}")


# Pairs absent here use the distiller's defaults: for DKD the cfg.py default beta 8 (mdistiller
# mdistiller/engine/cfg.py CFG.DKD.BETA), which the configs res32x4_res8x4, res32x4_shuv1, res32x4_shuv2,
# res50_mv2 and wrn40_2_shuv1 keep.
RECIPES: Dict[Tuple[str, str, str], Entry] = {
    # mdistiller configs/cifar100/dkd/res56_res20.yaml (DKD: BETA: 2.0); LS repo resnet56_resnet20.yaml (same)
    ("dkd", "resnet56", "resnet20"): _dkd(2.0, "res56_res20.yaml", "resnet56_resnet20.yaml"),
    # mdistiller configs/cifar100/dkd/res110_res32.yaml (BETA: 2.0); LS repo resnet110_resnet32.yaml (same)
    ("dkd", "resnet110", "resnet32"): _dkd(2.0, "res110_res32.yaml", "resnet110_resnet32.yaml"),
    # mdistiller configs/cifar100/dkd/vgg13_vgg8.yaml (BETA: 6.0); LS repo vgg13_vgg8.yaml (same)
    ("dkd", "vgg13", "vgg8"): _dkd(6.0, "vgg13_vgg8.yaml", "vgg13_vgg8.yaml"),
    # mdistiller configs/cifar100/dkd/vgg13_mv2.yaml (BETA: 6.0); LS repo vgg13_MobileNetV2.yaml (same)
    ("dkd", "vgg13", "MobileNetV2"): _dkd(6.0, "vgg13_mv2.yaml", "vgg13_MobileNetV2.yaml"),
    # mdistiller configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml (BETA: 6.0); LS repo wrn_40_2_wrn_16_2.yaml (same)
    ("dkd", "wrn_40_2", "wrn_16_2"): _dkd(6.0, "wrn40_2_wrn_16_2.yaml", "wrn_40_2_wrn_16_2.yaml"),
    # mdistiller configs/cifar100/dkd/wrn40_2_wrn_40_1.yaml (BETA: 6.0); LS repo wrn_40_2_wrn_40_1.yaml (same)
    ("dkd", "wrn_40_2", "wrn_40_1"): _dkd(6.0, "wrn40_2_wrn_40_1.yaml", "wrn_40_2_wrn_40_1.yaml"),
    # ReviewKD: dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh, one train.py line per pair with its
    # --kd-loss-weight (the train.py default is 1.0, the ReviewKD class's beta). The script has no vgg13 or
    # ResNet50 teacher (model/reviewkd.py builds those students, but no published weight goes with them).
    # --model wrn-16-2 --teacher wrn-40-2 --kd-loss-weight 5.0
    ("reviewkd", "wrn_40_2", "wrn_16_2"): _reviewkd(5.0),
    # --model wrn-40-1 --teacher wrn-40-2 --kd-loss-weight 5.0
    ("reviewkd", "wrn_40_2", "wrn_40_1"): _reviewkd(5.0),
    # --model shufflev1 --teacher wrn-40-2 --kd-loss-weight 5.0
    ("reviewkd", "wrn_40_2", "ShuffleV1"): _reviewkd(5.0),
    # --model resnet8x4 --teacher resnet32x4 --kd-loss-weight 5.0; mdistiller configs/cifar100/reviewkd.yaml
    # (its only CIFAR-100 ReviewKD config) repeats it: REVIEWKD_WEIGHT: 5.0
    ("reviewkd", "resnet32x4", "resnet8x4"): _reviewkd(5.0, f"{MDISTILLER} configs/cifar100/reviewkd.yaml"),
    # --model shufflev1 --teacher resnet32x4 --kd-loss-weight 5.0
    ("reviewkd", "resnet32x4", "ShuffleV1"): _reviewkd(5.0),
    # --model shufflev2 --teacher resnet32x4 --kd-loss-weight 8.0
    ("reviewkd", "resnet32x4", "ShuffleV2"): _reviewkd(8.0),
    # --model resnet20 --teacher resnet56 --kd-loss-weight 0.6
    ("reviewkd", "resnet56", "resnet20"): _reviewkd(0.6),
    # --model resnet32 --teacher resnet110 --kd-loss-weight 1.0 (the default, stated per pair by the script)
    ("reviewkd", "resnet110", "resnet32"): _reviewkd(1.0),
    # WTTM: no entries. zkxufo/TTM @ fe457b3 carries no per-pair values (its README has two examples only: TTM
    # vgg13 -> vgg8 with --ttm_l 0.1 -b 45, and WTTM added to CRD with --ttm_l 0.2 -a 4; scripts/ only fetches the
    # teachers); the paper (arXiv 2402.11148) lists its per-pair T and beta in appendix A.4, to be entered here from
    # there with the table's citation.
}


def _entry(distiller: str, teacher: str, student: str) -> Optional[Entry]:
    return RECIPES.get((distiller, teacher, student))


def recipe_for(distiller: str, teacher: str, student: str) -> dict:
    """The official per-pair options of ``distiller`` (canonical name) for teacher -> student; ``{}`` when the
    pair uses the distiller's defaults."""
    entry = _entry(distiller, teacher, student)
    return dict(entry.options) if entry is not None else {}


def with_recipe(distiller: str, teacher: str, student: str, options: Mapping) -> dict:
    """The options a run uses: the pair's recipe, with every option the config sets (not None) replacing it."""
    return {**recipe_for(distiller, teacher, student), **{k: v for k, v in options.items() if v is not None}}


def applied(distiller: str, teacher: str, student: str, options: Mapping) -> dict:
    """The recipe values a run actually uses: those the config does not set (recorded in results.json)."""
    return {k: v for k, v in recipe_for(distiller, teacher, student).items() if options.get(k) is None}


def describe(distiller: str, teacher: str, student: str, options: Mapping) -> Optional[str]:
    """One line naming the recipe values applied and their source, or None when the pair has no recipe."""
    entry = _entry(distiller, teacher, student)
    if entry is None:
        return None
    used = applied(distiller, teacher, student, options)
    overridden = sorted(set(entry.options) - set(used))
    values = ", ".join(f"{k}={v}" for k, v in used.items()) or "none"
    kept = f" (set by the config: {', '.join(overridden)})" if overridden else ""
    return f"recipe for {distiller} {teacher}->{student}: {values}{kept}; from {entry.source}"


# ---------------------------------------------------------------------------------------------------- MLKD
# MLKD's per-pair CIFAR-100 configs (Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml) set no
# distiller option (its KD block is mdistiller/engine/cfg.py's default: T 4, CE 0.1, KD 0.9, the class defaults);
# what they change per pair is the solver: lr 0.025 (0.01 for the MobileNetV2 / ShuffleNet students), 240 epochs
# (480 or 960 for some pairs, with the milestones kept at 150/180/210), batch 64, weight decay 5e-4 (kdjax's
# defaults but the lr). A run of ``distiller=mlkd`` on one of these pairs takes the pair's lr when ``optim.lr`` is
# unset (``solver_applied``); the run length is the config's (``epochs``: 240 unless set), and its recipe line
# names the fields that give the official 480- or 960-epoch run (``solver_hint``): a four-fold run is never
# started behind the user's back.
MLKD_REPO = "Jin-Ying/Multi-Level-Logit-Distillation"


class Solver(NamedTuple):
    lr: float
    epochs: int
    source: str


def _mlkd(config: str, lr: float, epochs: int) -> Solver:
    return Solver(lr, epochs, f"{MLKD_REPO} configs/cifar100/ours/{config}")


MLKD_SOLVER: Dict[Tuple[str, str], Solver] = {
    ("resnet56", "resnet20"): _mlkd("res56_res20.yaml", 0.025, 240),         # LR: 0.025, EPOCHS: 240
    ("resnet110", "resnet32"): _mlkd("res110_res32.yaml", 0.025, 240),       # LR: 0.025, EPOCHS: 240
    ("resnet32x4", "resnet8x4"): _mlkd("res32x4_res8x4.yaml", 0.025, 240),   # LR: 0.025, EPOCHS: 240
    ("wrn_40_2", "wrn_16_2"): _mlkd("wrn40_2_wrn_16_2.yaml", 0.025, 240),    # LR: 0.025, EPOCHS: 240
    ("wrn_40_2", "wrn_40_1"): _mlkd("wrn40_2_wrn_40_1.yaml", 0.025, 240),    # LR: 0.025, EPOCHS: 240
    ("vgg13", "vgg8"): _mlkd("vgg13_vgg8.yaml", 0.025, 240),                 # LR: 0.025, EPOCHS: 240
    ("vgg13", "MobileNetV2"): _mlkd("vgg13_mv2.yaml", 0.01, 480),            # LR: 0.01, EPOCHS: 480
    ("ResNet50", "MobileNetV2"): _mlkd("res50_mv2.yaml", 0.01, 480),         # LR: 0.01, EPOCHS: 480
    ("wrn_40_2", "ShuffleV1"): _mlkd("wrn40_2_shuv1.yaml", 0.01, 480),       # LR: 0.01, EPOCHS: 480
    ("resnet32x4", "ShuffleV1"): _mlkd("res32x4_shuv1.yaml", 0.01, 960),     # LR: 0.01, EPOCHS: 960
    ("resnet32x4", "ShuffleV2"): _mlkd("res32x4_shuv2.yaml", 0.01, 960),     # LR: 0.01, EPOCHS: 960
}


# ---------------------------------------------------------------------------------------------------- CTKD
# CTKD (zhengli97/CTKD) has one CIFAR-100 script, scripts/run_cifar_distill.sh (resnet56 -> resnet20: --t_start 1
# --t_end 20 --decay_max 0 --decay_min -1 --decay_loops 10), whose values are the defaults of
# kdjax.distillers.ctkd.CurriculumTemperature; its repository holds no per-pair values, so there are no rows here.


SOLVERS: Dict[str, Dict[Tuple[str, str], Solver]] = {"mlkd": MLKD_SOLVER}
PAPER_MILESTONES = (150, 180, 210)  # the solver tables' LR_DECAY_STAGES, absolute epochs


def solver_for(distiller: str, teacher: str, student: str) -> Optional[Solver]:
    """The official per-pair solver of ``distiller`` (canonical name) for teacher -> student, or None."""
    return SOLVERS.get(distiller, {}).get((teacher, student))


def solver_applied(distiller: str, teacher: str, student: str, lr_set: bool) -> dict:
    """The solver values a run takes from its pair's table: ``{"optim.lr": lr}`` when the config leaves
    ``optim.lr`` unset, else ``{}``."""
    solver = solver_for(distiller, teacher, student)
    return {"optim.lr": solver.lr} if solver is not None and not lr_set else {}


def solver_hint(distiller: str, teacher: str, student: str, epochs: int) -> Optional[str]:
    """What to set to follow the pair's official run length, when it differs from the run's ``epochs``."""
    solver = solver_for(distiller, teacher, student)
    if solver is None or solver.epochs == epochs:
        return None
    milestones = ",".join(map(str, PAPER_MILESTONES))
    return (f"the official run is {solver.epochs} epochs with milestones {milestones}: set epochs={solver.epochs} "
            f"optim.decay_epochs={milestones} to follow it")


def describe_run(distiller: str, teacher: str, student: str, options: Mapping, lr_set: bool,
                 epochs: int) -> Optional[str]:
    """The run's recipe line: the distiller options (``describe``) and the solver values applied, each with its
    source, plus the run-length hint; None when the pair has neither."""
    parts = [describe(distiller, teacher, student, options)]
    solver = solver_for(distiller, teacher, student)
    if solver is not None:
        used = solver_applied(distiller, teacher, student, lr_set)
        values = ", ".join(f"{k}={v}" for k, v in used.items()) or "none (set by the config: optim.lr)"
        hint = solver_hint(distiller, teacher, student, epochs)
        parts.append(f"solver for {distiller} {teacher}->{student}: {values}; from {solver.source}"
                     + (f"; {hint}" if hint else ""))
    parts = [p for p in parts if p]
    return "; ".join(parts) if parts else None

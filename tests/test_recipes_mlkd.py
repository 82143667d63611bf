"""MLKD's per-pair solver table against its official CIFAR-100 configs (Jin-Ying/Multi-Level-Logit-Distillation @
5ee473f, configs/cifar100/ours/*.yaml: SOLVER.LR and SOLVER.EPOCHS; none sets a KD block, so the distiller's options
are the cfg.py defaults for every pair)."""
from kdjax import distillers, models
from kdjax.configs import recipes

OFFICIAL = {  # (teacher, student): (LR, EPOCHS, file)
    ("resnet56", "resnet20"): (0.025, 240, "res56_res20.yaml"),
    ("resnet110", "resnet32"): (0.025, 240, "res110_res32.yaml"),
    ("resnet32x4", "resnet8x4"): (0.025, 240, "res32x4_res8x4.yaml"),
    ("wrn_40_2", "wrn_16_2"): (0.025, 240, "wrn40_2_wrn_16_2.yaml"),
    ("wrn_40_2", "wrn_40_1"): (0.025, 240, "wrn40_2_wrn_40_1.yaml"),
    ("vgg13", "vgg8"): (0.025, 240, "vgg13_vgg8.yaml"),
    ("vgg13", "MobileNetV2"): (0.01, 480, "vgg13_mv2.yaml"),
    ("ResNet50", "MobileNetV2"): (0.01, 480, "res50_mv2.yaml"),
    ("wrn_40_2", "ShuffleV1"): (0.01, 480, "wrn40_2_shuv1.yaml"),
    ("resnet32x4", "ShuffleV1"): (0.01, 960, "res32x4_shuv1.yaml"),
    ("resnet32x4", "ShuffleV2"): (0.01, 960, "res32x4_shuv2.yaml"),
}


def test_mlkd_solver_table_is_the_official_configs():
    assert set(recipes.MLKD_SOLVER) == set(OFFICIAL)
    for pair, (lr, epochs, config) in OFFICIAL.items():
        entry = recipes.MLKD_SOLVER[pair]
        assert (entry.lr, entry.epochs) == (lr, epochs), pair
        assert entry.source == f"Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/{config}"
        for name in pair:
            models.check_name(name)  # kdjax's spelling of the official model names


def test_mlkd_has_no_per_pair_distiller_options():
    assert not any(d == "mlkd" for d, _, _ in recipes.RECIPES)
    for pair in OFFICIAL:
        assert recipes.recipe_for("mlkd", *pair) == {}
    assert distillers.create("mlkd").default_weights() == {"gamma": 0.1, "alpha": 0.9, "beta": 0.0}

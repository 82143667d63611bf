"""The per-pair recipe table against the official configs, and how a run applies it (a config value wins)."""
import pytest

from helpers import load_config
from kdjax.configs import recipes
from kdjax.train import kd

# (teacher, student) -> DKD.BETA, as read in the official configs (mdistiller @ a08d46f, logit-standardization-KD
# @ f6e5aa5 repeats them under its own file names); the file of each value is in the comment.
OFFICIAL_DKD_BETA = {
    ("resnet56", "resnet20"): 2.0,     # mdistiller configs/cifar100/dkd/res56_res20.yaml
    ("resnet110", "resnet32"): 2.0,    # mdistiller configs/cifar100/dkd/res110_res32.yaml
    ("vgg13", "vgg8"): 6.0,            # mdistiller configs/cifar100/dkd/vgg13_vgg8.yaml
    ("vgg13", "MobileNetV2"): 6.0,     # mdistiller configs/cifar100/dkd/vgg13_mv2.yaml
    ("wrn_40_2", "wrn_16_2"): 6.0,     # mdistiller configs/cifar100/dkd/wrn40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): 6.0,     # mdistiller configs/cifar100/dkd/wrn40_2_wrn_40_1.yaml
    # no DKD section: the cfg.py default BETA 8.0 (mdistiller/engine/cfg.py)
    ("resnet32x4", "resnet8x4"): 8.0,  # mdistiller configs/cifar100/dkd/res32x4_res8x4.yaml
    ("resnet32x4", "ShuffleV1"): 8.0,  # mdistiller configs/cifar100/dkd/res32x4_shuv1.yaml
    ("resnet32x4", "ShuffleV2"): 8.0,  # mdistiller configs/cifar100/dkd/res32x4_shuv2.yaml
    ("ResNet50", "MobileNetV2"): 8.0,  # mdistiller configs/cifar100/dkd/res50_mv2.yaml
    ("wrn_40_2", "ShuffleV1"): 8.0,    # mdistiller configs/cifar100/dkd/wrn40_2_shuv1.yaml
}


def make_distiller(config):
    return kd.KDMethod.from_config(config).distiller


def dkd_config(teacher, student, arg=""):
    config = load_config("distill", arg)
    config.distiller, config.teacher, config.student = "dkd", teacher, student
    return config


@pytest.mark.parametrize("pair,beta", OFFICIAL_DKD_BETA.items(), ids=["-".join(p) for p in OFFICIAL_DKD_BETA])
def test_dkd_beta_per_pair_is_the_official_configs(pair, beta):
    assert make_distiller(dkd_config(*pair)).dkd_beta == beta
    if beta != 8.0:
        entry = recipes.RECIPES[("dkd", *pair)]
        assert entry.options == {"dkd_beta": beta} and "megvii-research/mdistiller" in entry.source
    else:
        assert recipes.recipe_for("dkd", *pair) == {}


def test_every_table_entry_is_checked_above_and_cites_its_source():
    dkd_pairs = {(t, s) for d, t, s in recipes.RECIPES if d == "dkd"}
    assert dkd_pairs <= set(OFFICIAL_DKD_BETA)
    assert all("configs/cifar100/" in e.source or "CIFAR-100/script/" in e.source for e in recipes.RECIPES.values())


def test_a_config_value_overrides_the_recipe_field_by_field():
    config = dkd_config("resnet56", "resnet20")
    config.distill.dkd_beta = 8.0
    config.distill.dkd_alpha = 0.5
    d = make_distiller(config)
    assert (d.dkd_beta, d.dkd_alpha) == (8.0, 0.5)
    set_by_config = config.distill.to_dict()
    assert recipes.applied("dkd", "resnet56", "resnet20", set_by_config) == {}
    assert "set by the config: dkd_beta" in recipes.describe("dkd", "resnet56", "resnet20", set_by_config)


def test_recipe_is_recorded_and_described_when_applied():
    config = dkd_config("vgg13", "vgg8")
    unset = config.distill.to_dict()
    assert recipes.applied("dkd", "vgg13", "vgg8", unset) == {"dkd_beta": 6.0}
    line = recipes.describe("dkd", "vgg13", "vgg8", unset)
    assert "dkd_beta=6.0" in line and "configs/cifar100/dkd/vgg13_vgg8.yaml" in line
    # the pair has no recipe for another distiller, and the alias-free canonical name is what is looked up
    assert recipes.describe("kd", "vgg13", "vgg8", unset) is None
    assert make_distiller(load_config("distill")).name == "kd"


@pytest.mark.slow
def test_a_run_of_a_recipe_pair_prints_and_records_it(tmp_path, monkeypatch, capsys):
    """Through the command line (in this process, so that the table can hold the tiny pair): the recipe's line
    among the run's first lines, its values in results.json, and the distiller built with them."""
    import json

    from kdjax import cli
    tiny = ["--config.dataset=digits", "--config.image_size=8", "--config.batch_size=32", "--config.last_batch=drop",
            "--config.epochs=1", "--config.eval_every=1"]
    cli.main(["teacher", "--config.model=resnet8", *tiny, f"--workdir={tmp_path / 'teacher'}"])
    monkeypatch.setitem(recipes.RECIPES, ("dkd", "resnet8", "resnet8"),
                        recipes.Entry({"dkd_beta": 2.0}, "a test's own table entry"))
    capsys.readouterr()
    cli.main(["distill", "--config.teacher=resnet8", "--config.student=resnet8", "--config.distiller=dkd", *tiny,
              f"--config.teacher_checkpoint={tmp_path / 'teacher'}", f"--workdir={tmp_path / 'student'}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[distill] recipe for dkd resnet8->resnet8: dkd_beta=2.0; from a test's own table entry")
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["recipe"] == {"dkd_beta": 2.0}

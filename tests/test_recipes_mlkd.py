"""MLKD's per-pair solver table against its official CIFAR-100 configs (Jin-Ying/Multi-Level-Logit-Distillation @
5ee473f, configs/cifar100/ours/*.yaml: SOLVER.LR and SOLVER.EPOCHS; none sets a KD block, so the distiller's options
are the cfg.py defaults for every pair)."""
import pytest

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


def _spec(teacher, student, lr=None):
    from helpers import load_config
    from kdjax.train import kd
    config = load_config("distill", f"distiller=mlkd,teacher={teacher},student={student}")
    config.optim.lr = lr
    return kd.DistillSpec.from_config(config, kd.KDMethod.from_config(config))


def test_an_mlkd_run_of_a_known_pair_takes_its_official_lr_unless_the_config_sets_one():
    spec = _spec("resnet56", "resnet20")
    assert spec.training.base_lr == 0.025 and spec.recipe == {"optim.lr": 0.025}
    assert spec.recipe_line == ("solver for mlkd resnet56->resnet20: optim.lr=0.025; from "
                                "Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/res56_res20.yaml")
    small = _spec("vgg13", "MobileNetV2")  # 0.01, the rule's value for this student too, now from the table
    assert small.training.base_lr == 0.01 and small.recipe == {"optim.lr": 0.01}
    assert "set epochs=480 optim.decay_epochs=150,180,210 to follow it" in small.recipe_line
    assert small.training.epochs == 240  # the run length stays the config's
    given = _spec("resnet56", "resnet20", lr=0.1)
    assert given.training.base_lr == 0.1 and given.recipe == {}
    assert "none (set by the config: optim.lr)" in given.recipe_line
    other = _spec("resnet8", "resnet8")  # no official pair: the lr rule, no line
    assert other.training.base_lr == 0.05 and other.recipe == {} and other.recipe_line is None


def test_the_run_length_hint_disappears_once_the_run_follows_the_official_length():
    assert recipes.solver_hint("mlkd", "resnet32x4", "ShuffleV1", 240).startswith("the official run is 960 epochs")
    assert recipes.solver_hint("mlkd", "resnet32x4", "ShuffleV1", 960) is None
    assert recipes.solver_hint("kd", "resnet32x4", "ShuffleV1", 240) is None  # other distillers: no solver table
    assert recipes.solver_applied("dkd", "resnet56", "resnet20", lr_set=False) == {}


@pytest.mark.slow
def test_an_mlkd_run_of_a_table_pair_prints_records_and_trains_with_its_lr(tmp_path, monkeypatch, capsys):
    """Through the command line (in this process, so that the table can hold the tiny pair): the solver line first,
    the lr in results.json's recipe and as the lr the run trained with."""
    import json

    from kdjax import cli
    tiny = ["--config.dataset=digits", "--config.image_size=8", "--config.batch_size=32", "--config.last_batch=drop",
            "--config.epochs=1", "--config.eval_every=1"]
    cli.main(["teacher", "--config.model=resnet8", *tiny, f"--workdir={tmp_path / 'teacher'}"])
    monkeypatch.setitem(recipes.MLKD_SOLVER, ("resnet8", "resnet8"), recipes.Solver(0.02, 2, "a test's own row"))
    capsys.readouterr()
    cli.main(["distill", "--config.teacher=resnet8", "--config.student=resnet8", "--config.distiller=mlkd", *tiny,
              f"--config.teacher_checkpoint={tmp_path / 'teacher'}", f"--workdir={tmp_path / 'student'}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("[distill] solver for mlkd resnet8->resnet8: optim.lr=0.02; from a test's own row; the "
                        "official run is 2 epochs with milestones 150,180,210: set epochs=2 "
                        "optim.decay_epochs=150,180,210 to follow it")
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results["recipe"] == {"optim.lr": 0.02} and results["lr"] == 0.02

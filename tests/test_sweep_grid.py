"""kdjax.sweep.grid: the plan of the paper's grid (layout, order, skipping, names checked first)."""
import os

import pytest

from helpers import load_config
from kdjax import sweep


def test_plan_of_the_paper_grid():
    config = load_config("sweep")
    runs = sweep.plan(config, "/r")
    tasks = [r.task for r in runs]
    # 5 teachers, 5 teachers x 3 seeds T. stddev (8 schemes in one program), 9 pairs x 9 schemes x 3 seeds students,
    # 9 pairs x 3 seeds T. stddev of CutMixPick (S. ent.) with that pair's student
    assert tasks.count("teacher") == 5 and tasks.count("distill") == 243 and tasks.count("tstddev") == 15 + 27
    assert [r.stage for r in runs] == sorted(r.stage for r in runs)
    by_dir = {r.workdir: dict(r.fields) for r in runs}
    student = by_dir["/r/resnet56-resnet20/cutmix_pick_t/seed2"]
    assert student["teacher_checkpoint"] == "/r/teachers/resnet56" and student["epochs"] == 240
    cmp_s = by_dir["/r/tstddev/resnet56-resnet20/cutmix_pick_s/seed1"]
    assert cmp_s["student_checkpoint"] == "/r/resnet56-resnet20/cutmix_pick_s/seed1" and cmp_s["aug"] == "cutmix_pick_s"
    assert by_dir["/r/tstddev/vgg13/seed0"]["aug"] == "all"


def test_plan_uses_given_teachers_and_subsets_and_rejects_bad_names(tmp_path):
    config = load_config("sweep", "pairs=resnet56:resnet20,augs=cutmix+mixup,seeds=0,datasets=digits")
    config.teacher_checkpoints.resnet56 = "/t/r56"
    runs = sweep.plan(config, str(tmp_path))
    assert [r.task for r in runs] == ["tstddev", "tstddev", "distill", "distill"]
    assert {dict(r.fields)["teacher_checkpoint"] for r in runs} == {"/t/r56"}
    finished = runs[2]
    os.makedirs(finished.workdir)
    open(os.path.join(finished.workdir, "results.json"), "w").write("{}")
    assert finished.done and not runs[3].done
    for arg, message in (("pairs=resnet56:resnet9", "unknown model 'resnet9'"), ("augs=cutmax", "cutmax"),
                         ("pairs=resnet56", "teacher:student")):
        with pytest.raises(ValueError, match=message):
            sweep.plan(load_config("sweep", arg + ",datasets=digits"), str(tmp_path))


def test_lists_are_data_on_the_command_line_and_after_the_colon():
    from kdjax import configs
    config = load_config("sweep", "pairs=resnet56:resnet20+vgg13:vgg8,seeds=0+1")
    assert config.pairs == ("resnet56:resnet20", "vgg13:vgg8") and config.seeds == (0, 1)
    configs.set_field(config, "seeds", "3,4,5")
    configs.set_field(config, "augs", "cutmix,mixup")
    assert config.seeds == (3, 4, 5) and config.augs == ("cutmix", "mixup")
    with pytest.raises(configs.ConfigError, match="teacher_checkpoints is a group of fields.*teacher_checkpoints"):
        configs.set_field(config, "teacher_checkpoints", "resnet56=/t")
    with pytest.raises(configs.ConfigError, match="did you mean 'seeds'"):
        configs.set_field(config, "seedz", "1")

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
    # eight of the nine schemes share one compiled KD step (kdjax.augment.switch): every student asks for it
    assert all(dict(r.fields).get("scheme_switch") is True for r in runs if r.task == "distill")
    cmp_s = by_dir["/r/tstddev/resnet56-resnet20/cutmix_pick_s/seed1"]
    assert cmp_s["student_checkpoint"] == "/r/resnet56-resnet20/cutmix_pick_s/seed1" and cmp_s["aug"] == "cutmix_pick_s"
    assert by_dir["/r/tstddev/vgg13/seed0"]["aug"] == "all"


def test_plan_uses_given_teachers_and_subsets_and_rejects_bad_names(tmp_path):
    config = load_config("sweep", "pairs=resnet56:resnet20,augs=cutmix+mixup,seeds=0,datasets=digits")
    config.teacher_checkpoints.resnet56 = "/t/r56"
    runs = sweep.plan(config, str(tmp_path))
    assert [r.task for r in runs] == ["tstddev", "tstddev", "distill", "distill"]
    # two schemes compile a program each: the switch of all eight would cost as much (three or more share it)
    assert [dict(r.fields).get("scheme_switch") for r in runs[2:]] == [None, None]
    three = sweep.plan(load_config("sweep", "pairs=resnet56:resnet20,augs=cutmix+mixup+flip,seeds=0,"
                                            "datasets=digits"), str(tmp_path))
    assert [dict(r.fields).get("scheme_switch") for r in three if r.task == "distill"] == [True] * 3
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


def _small(arg=""):
    return load_config("sweep", "pairs=resnet56:resnet20,augs=cutmix+cutmix_pick_s,seeds=0+1,datasets=digits"
                       + (f",{arg}" if arg else ""))


# The plan of _small() before the distiller axis: every kd run keeps its workdir and fields (so that the sweeps
# begun before it resume, and find their finished runs).
KD_ONLY = [
    ("teacher", "/r/teachers/resnet56", 0), ("tstddev", "/r/tstddev/resnet56/seed0/cutmix", 1),
    ("tstddev", "/r/tstddev/resnet56/seed1/cutmix", 1),
    ("distill", "/r/resnet56-resnet20/cutmix/seed0", 2), ("distill", "/r/resnet56-resnet20/cutmix/seed1", 2),
    ("distill", "/r/resnet56-resnet20/cutmix_pick_s/seed0", 2),
    ("distill", "/r/resnet56-resnet20/cutmix_pick_s/seed1", 2),
    ("tstddev", "/r/tstddev/resnet56-resnet20/cutmix_pick_s/seed0", 3),
    ("tstddev", "/r/tstddev/resnet56-resnet20/cutmix_pick_s/seed1", 3)]


def test_kd_only_grid_is_the_grid_of_before():
    runs = sweep.plan(_small(), "/r")
    assert _small().distillers == ("kd",)
    assert [(r.task, r.workdir, r.stage) for r in runs] == KD_ONLY
    student = dict(runs[3].fields)
    assert "distiller" not in student and "distill.with_kd" not in student
    assert sorted(student) == ["aug", "batch_size", "checkpoint_every", "compile_cache_dir", "dataset", "dtype",
                               "epoch_factor", "epochs", "eval_every", "last_batch", "seed", "steps_per_dispatch",
                               "student", "teacher", "teacher_checkpoint"]
    assert {k: student[k] for k in ("teacher", "student", "aug", "seed", "teacher_checkpoint")} == dict(
        teacher="resnet56", student="resnet20", aug="cutmix", seed=0, teacher_checkpoint="/r/teachers/resnet56")
    # an explicit distillers=kd plans the same runs
    assert sweep.plan(_small("distillers=kd"), "/r") == runs
    assert runs[3].describe() == ("distill aug=cutmix dataset=digits distiller=kd seed=0 student=resnet20 "
                                  "teacher=resnet56 -> /r/resnet56-resnet20/cutmix/seed0")


def test_distiller_axis_adds_a_student_per_distiller_and_shares_the_rest():
    from kdjax.sweep.executor import build_config, command_line, inputs_of
    runs = sweep.plan(_small("distillers=kd+crd_kd+attention"), "/r")
    kd_runs = [r for r in runs if r.task != "distill" or "distiller" not in dict(r.fields)]
    assert [(r.task, r.workdir, r.stage) for r in kd_runs] == KD_ONLY  # teachers, T. stddev shared; kd's unchanged
    others = {r.workdir: r for r in runs if r.task == "distill" and "distiller" in dict(r.fields)}
    assert sorted(others) == sorted(f"/r/{d}/resnet56-resnet20/{aug}/seed{s}" for d in ("crd_kd", "at")
                                    for aug in ("cutmix", "cutmix_pick_s") for s in (0, 1))
    assert [r.stage for r in runs] == sorted(r.stage for r in runs)
    crd = others["/r/crd_kd/resnet56-resnet20/cutmix_pick_s/seed1"]
    fields = dict(crd.fields)
    assert fields["distiller"] == "crd" and fields["distill.with_kd"] is True and fields["seed"] == 1
    assert fields["teacher_checkpoint"] == "/r/teachers/resnet56"
    config = build_config(crd)
    assert config.distiller == "crd" and config.distill.with_kd is True and config.aug == "cutmix_pick_s"
    argv = command_line(crd)
    assert "--config.distiller=crd" in argv and "--config.distill.with_kd=True" in argv
    at = dict(others["/r/at/resnet56-resnet20/cutmix/seed0"].fields)
    assert at["distiller"] == "at" and "distill.with_kd" not in at  # the alias is stored canonical
    assert build_config(others["/r/at/resnet56-resnet20/cutmix/seed0"]).distill.with_kd is None
    assert "distiller=crd+kd" in crd.describe() and "distiller=at " in others[
        "/r/at/resnet56-resnet20/cutmix/seed0"].describe()
    # students depend on their teacher; the S. ent. T. stddev on kd's student (kd is swept)
    inputs = inputs_of(runs)
    assert [p.workdir for p in inputs[crd.workdir]] == ["/r/teachers/resnet56"]
    assert sorted(p.workdir for p in inputs["/r/tstddev/resnet56-resnet20/cutmix_pick_s/seed1"]) == [
        "/r/resnet56-resnet20/cutmix_pick_s/seed1", "/r/teachers/resnet56"]
    assert len({r.workdir for r in runs}) == len(runs) == 9 + 8


def test_ctkd_joins_the_distiller_axis_as_a_suffix():
    """kd+ctkd, dkd+ctkd and crd+kd+ctkd: CTKD's learned temperature on the method's logit terms, each its own
    student under ``<label with _>/``, its config carrying ctkd.mode=global; the CTKD-free runs are unchanged."""
    from kdjax.sweep import analysis
    from kdjax.sweep.executor import build_config, command_line
    runs = sweep.plan(_small("distillers=kd+kd_ctkd+dkd_ctkd+crd_kd_ctkd"), "/r")
    kd_runs = [r for r in runs if r.task != "distill" or "distiller" not in dict(r.fields)
               and "ctkd.mode" not in dict(r.fields)]
    assert [(r.task, r.workdir, r.stage) for r in kd_runs] == KD_ONLY
    students = {r.workdir: r for r in runs if r.task == "distill"}
    for label, top, distiller, with_kd in (("kd+ctkd", "kd_ctkd", "kd", False), ("dkd+ctkd", "dkd_ctkd", "dkd", False),
                                           ("crd+kd+ctkd", "crd_kd_ctkd", "crd", True)):
        run = students[f"/r/{top}/resnet56-resnet20/cutmix/seed0"]
        fields = dict(run.fields)
        assert fields["ctkd.mode"] == "global" and fields.get("distiller", "kd") == distiller
        assert bool(fields.get("distill.with_kd")) == with_kd
        config = build_config(run)
        assert config.ctkd.mode == "global" and config.distiller == distiller
        assert "--config.ctkd.mode=global" in command_line(run)
        assert f"distiller={label} " in run.describe()
        record = {"distiller": distiller, "config": config.to_dict()}
        assert analysis.distiller_of(record) == label
    plain = build_config(students["/r/resnet56-resnet20/cutmix/seed0"])
    assert plain.ctkd.mode in (None, "none")
    assert analysis.distiller_of({"distiller": "kd", "config": plain.to_dict()}) == "kd"


def test_without_kd_the_first_distiller_scores_cutmix_pick_s():
    runs = sweep.plan(_small("distillers=crd_kd"), "/r")  # after the colon, "+" would join crd and kd
    assert not [r for r in runs if r.task == "distill" and "distiller" not in dict(r.fields)]
    cmp_s = {r.workdir: dict(r.fields) for r in runs if r.stage == 3}
    # kept apart from the kd-scored runs of an earlier sweep in the same workdir
    assert sorted(cmp_s) == ["/r/tstddev/crd_kd/resnet56-resnet20/cutmix_pick_s/seed0",
                             "/r/tstddev/crd_kd/resnet56-resnet20/cutmix_pick_s/seed1"]
    assert cmp_s["/r/tstddev/crd_kd/resnet56-resnet20/cutmix_pick_s/seed0"]["student_checkpoint"] == \
        "/r/crd_kd/resnet56-resnet20/cutmix_pick_s/seed0"


@pytest.mark.parametrize("value,message", [
    ("kd+kd", "'kd\\+kd' has no '\\+KD' variant \\(kd is KD itself\\); valid: .*crd.*, e.g. crd\\+kd"),
    ("dkd+kd", "'dkd\\+kd' has no '\\+KD' variant \\(dkd replaces KD's KL terms\\); valid: "),
    ("crd,crdd", "unknown distiller 'crdd'; valid: .*crd, .*kd.*aliases: .*attention \\(at\\)"),
    ("crdd+kd", "unknown distiller 'crdd' \\(in 'crdd\\+kd'\\)"),
    ("crd,crd_kd,crd+kd", "'crd\\+kd' repeats 'crd_kd' \\(both are crd\\+kd\\)"),
    ("at,attention", "'attention' repeats 'at'"),
    ("dist_ctkd", "'dist_ctkd': ctkd.mode=global learns the temperature of kd's KL .* not of distiller=dist"),
    ("kd_ctkd,kd+ctkd", "'kd\\+ctkd' repeats 'kd_ctkd' \\(both are kd\\+ctkd\\)"),
    ("kd+ctkd+kd", "unknown distiller"),
    ("", "the sweep has no distillers"),
])
def test_bad_distillers_are_refused_in_one_line(tmp_path, value, message):
    from kdjax import configs
    from kdjax.tasks import sweep as sweep_task
    config = _small()
    configs.set_field(config, "distillers", value)
    with pytest.raises(ValueError, match=message) as error:
        sweep.plan(config, str(tmp_path / "w"))
    assert "\n" not in str(error.value)
    # the sweep task refuses before it looks at any dataset (optional ones included) or makes a directory
    config.optional_datasets = ("tiny_imagenet",)
    with pytest.raises(ValueError, match=message):
        sweep_task.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()

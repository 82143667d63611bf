"""The 'tstddev' task: its checks before loading, and a launch end to end on digits."""
import json
import os

import pytest

from kdjax import augment
from kdjax import data as kdata
from kdjax.checkpoint import save_model
from kdjax.tstddev import evaluator as te
from test_tstddev_evaluator import TINY, _variables


def _config(**fields):
    from helpers import load_config

    config = load_config("tstddev")
    for k, v in fields.items():
        config[k] = v
    return config


def test_task_checks_fields_before_loading(tmp_path):
    from kdjax.tasks import tstddev as task

    with pytest.raises(ValueError, match="student_checkpoint"):
        task.run(_config(teacher=TINY, aug="cutmix_pick_s", teacher_checkpoint=str(tmp_path / "nothing")),
                 str(tmp_path / "w1"))
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        task.check(_config(teacher=TINY, aug="identity"))
    with pytest.raises(ValueError, match="valid augmentations.*'all'"):
        task.check(_config(teacher=TINY, aug="cutmixx", teacher_checkpoint="x"))
    assert not os.path.exists(tmp_path / "w1")
    names = task.scheme_names(_config(teacher=TINY, aug="all"))
    assert names == [n for n in augment.PAPER_SCHEMES if n != "cutmix_pick_s"]


def test_launch_end_to_end_on_digits(tmp_path):
    """launch.py with configs/tstddev.py, aug=all, the tiny_cnn plugin model as teacher and student."""
    import tiny_models  # noqa: F401  (registers tiny_cnn here too, to write its checkpoints)
    from helpers import launch

    from kdjax.tasks import tstddev as task

    size = 16
    digits = kdata.load("digits", image_size=size)
    meta = {"model": "tiny_cnn", "num_classes": 10, "image_size": size, "dataset": "digits",
            "mean": list(digits.mean), "std": list(digits.std)}
    save_model(str(tmp_path / "teacher"), _variables(2, size, 10, "tiny_cnn"), meta)
    save_model(str(tmp_path / "student"), _variables(3, size, 10, "tiny_cnn"), meta)
    workdir = tmp_path / "run"
    proc = launch("tstddev.py:teacher=tiny_cnn,dataset=digits,aug=all,epochs=1", workdir,
                  "--config.image_size=16", f"--config.teacher_checkpoint={tmp_path / 'teacher'}",
                  f"--config.student_checkpoint={tmp_path / 'student'}", "--config.steps_per_dispatch=8",
                  "--config.steps_per_forward=2", "--config.verbose=true")

    groups = te.expected_groups(digits.num_train, 64, 1)
    values = {}
    for name in augment.PAPER_SCHEMES:
        with open(workdir / name / "results.json") as f:
            r = json.load(f)
        assert r["task"] == "tstddev" and r["aug"] == name and r["teacher"] == "tiny_cnn"
        assert r["dataset"] == "digits" and r["groups"] == groups and r["tstddev"] > 0
        for field in ("tstddev_se", "mean_entropy", "wall_s", "images_per_s", "device_kind", "versions", "config",
                      "seed", "epochs"):
            assert field in r, field
        assert r.get("student") == ("tiny_cnn" if name == "cutmix_pick_s" else None)
        values[name] = r["tstddev"]
        assert f"[tstddev:{name}] Check T prob: NumOfSampledStd {groups} Epoch 1 Step 22 TotalStep 22 MeanStd " \
               f"{r['tstddev']:.6f} MeanEntropy {r['mean_entropy']:.6f}" in proc.stdout
    table = (workdir / "tstddev.md").read_text()
    assert all(f"| {name} | {value:.6f} |" in table for name, value in values.items())
    assert table in proc.stdout

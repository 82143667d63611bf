"""A workdir written by kdjax 0.1 (before the package layout, config-as-data and checkpoint digests): it resumes
to exactly the result the uninterrupted 0.1 run recorded, and its checkpoints load (unverified, said once).

The fixture is that version's teacher run (resnet8 on digits at 8 px, 2 epochs, a checkpoint per epoch) with its
final checkpoint and results.json removed, so it resumes from epoch 1; the 0.1 run's own results are beside it."""
import json
import shutil

from helpers import load_config
from kdjax.checkpoint import load_model
from kdjax.tasks import teacher

LEGACY = "legacy_v0_1"


def test_a_legacy_workdir_resumes_bit_identically(tmp_path, fixtures_dir, capsys):
    workdir = tmp_path / "teacher_resnet8"
    shutil.copytree(fixtures_dir / LEGACY / "teacher_resnet8", workdir)
    want = json.loads((fixtures_dir / LEGACY / "teacher_resnet8_expected_results.json").read_text())
    config = load_config("teacher", "model=resnet8,dataset=digits,epochs=2,image_size=8,checkpoint_every=1")
    got = teacher.run(config, str(workdir))
    assert got["test_loss"] == want["test_loss"] and got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert "written without a content digest" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [s for s, line in zip(steps, (workdir / "metrics.jsonl").read_text().splitlines())
                  if '"lr"' in line]
    assert len(train_rows) == len(set(train_rows)) == 46  # each step once, the replayed epoch included


def test_a_legacy_checkpoint_loads_as_a_teacher(fixtures_dir):
    variables, meta = load_model(str(fixtures_dir / LEGACY / "teacher_resnet8" / "checkpoints" / "23"))
    assert meta["model"] == "resnet8" and meta["image_size"] == 8 and "digest" not in meta
    assert variables["params"]["fc"]["kernel"].shape == (64, 10)

"""``kdjax prepare_data`` through the command line: the official-format tars become verified record shards that the
streamed source opens; a missing class is one line, before anything is written."""
import json

import pytest

import streamed_inputs
from kdjax import cli
from kdjax.data.streamed import StreamedDataset, dataset_root


def prepare(tmp_path, manual, *extra):
    wnids = ",".join(streamed_inputs.classes())
    argv = ["prepare_data", "--config.dataset=imagenet", f"--config.manual_dir={manual}",
            f"--config.data_dir={tmp_path / 'data'}", "--config.workers=1", "--config.records_per_shard=8",
            f"--config.classes={wnids}", f"--workdir={tmp_path / 'run'}", *extra]
    cli.main(argv)


def test_prepare_data_writes_shards_the_streamed_source_opens(tmp_path, capsys):
    images = streamed_inputs.make_images()
    manual = streamed_inputs.write_tars(tmp_path / "manual", images)
    prepare(tmp_path, manual)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    n_train = sum(len(v) for v in images["train"].values())
    n_test = sum(len(v) for v in images["test"].values())
    assert (results["train"], results["test"], results["num_classes"]) == (n_train, n_test, 5)
    data = StreamedDataset.open(dataset_root(tmp_path / "data", "imagenet"))
    assert (data.num_train, data.num_test, data.num_classes) == (n_train, n_test, 5)
    assert "verified shards" in capsys.readouterr().out


def test_a_missing_class_is_one_line_and_writes_no_manifest(tmp_path, capsys):
    images = streamed_inputs.make_images()
    missing = streamed_inputs.classes()[2]
    manual = streamed_inputs.write_tars(tmp_path / "manual", images, skip_class=missing)
    with pytest.raises(SystemExit) as exit_:
        prepare(tmp_path, manual)
    assert exit_.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and missing in errors[0]
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list((tmp_path / "data").rglob("manifest.json"))

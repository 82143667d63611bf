"""Every refusal the command line can reach is one line on stderr (``error: ...``), names its fix, and does not
contradict itself. Each case runs ``kdjax.cli.main`` in this process up to its refusal (before any compile, but
the full-disk case, which needs a first metrics row)."""
import json
import os
import re
import socket

import numpy as np
import pytest

import tiny_models  # noqa: F401  (registers tiny_cnn)
from kdjax import cli
from kdjax.checkpoint import save_model, store

TEACHER = ["teacher", "--config.model=tiny_cnn", "--config.dataset=synthetic", "--config.image_size=8",
           "--config.batch_size=32", "--config.dataset_options.num_train=64", "--config.dataset_options.num_test=32",
           "--config.epochs=1"]
STUDENT = ["distill", "--config.teacher=none", "--config.student=tiny_cnn", "--config.dataset=synthetic",
           "--config.image_size=8"]


def _nan_teacher(where):
    variables = {"params": {"fc": {"kernel": np.array([[1.0, np.nan]], np.float32)}}, "batch_stats": {}}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(store, "check_finite", lambda *args: None)  # as an older kdjax could have saved it
        save_model(str(where / "checkpoints"), variables, {"model": "tiny_cnn", "num_classes": 10, "image_size": 8,
                                                           "dataset": "synthetic"})
    (where / "results.json").write_text(json.dumps({"task": "teacher"}))
    return where


def _pth_with_duplicate_key(path):
    from test_torch_reader import Raw, Tensor, floats, op_str, op_tensor, pickle_of, zip_checkpoint
    entry = Raw(op_str("fc.weight") + op_tensor(Tensor("0", 2, (2,), (1,))))
    pkl = pickle_of(Raw(b"}(" + bytes(entry) + bytes(entry) + b"u"))
    path.write_bytes(zip_checkpoint(pkl, {"0": floats(1, 2)}))
    return path


def _setup(case, tmp_path, monkeypatch):
    """The argv of ``case`` after preparing what it needs under ``tmp_path``."""
    w = f"--workdir={tmp_path / 'w'}"
    if case == "negative lr":
        return TEACHER + ["--config.optim.lr=-0.1", w]
    if case == "zero temperature":
        return STUDENT + ["--config.loss.temperature=0", w]
    if case == "no test images":
        return TEACHER + ["--config.dataset_options.num_test=0", w]
    if case == "seed beyond any key":
        return TEACHER + [f"--config.seed={2 ** 70}", w]
    if case == "absurd image size":
        return TEACHER + ["--config.image_size=10000", w]
    if case == "epochs zero":
        return TEACHER + ["--config.epochs=0", w]
    if case == "batch larger than the dataset":
        return TEACHER + ["--config.batch_size=128", w]
    if case == "checkpoints is a file":
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "checkpoints").write_text("not a folder")
        return TEACHER + [w]
    if case == "malformed lock file":
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / ".kdjax.lock").write_text('{"pid": "abc", "host": 3}')
        return TEACHER + [w]
    if case == "live lock holder":
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / ".kdjax.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": 0.0, "token": "x"}))
        return TEACHER + [w]
    if case == "config file raises on import":
        (tmp_path / "bad.py").write_text("raise RuntimeError('no such cluster')\n")
        return [f"--config={tmp_path / 'bad.py'}", w]
    if case == "get_config raises":
        (tmp_path / "bad2.py").write_text("def get_config(arg=None):\n    return {}['missing']\n")
        return [f"--config={tmp_path / 'bad2.py'}", w]
    if case == "plugin raises on import":
        (tmp_path / "bad_plugin.py").write_text("import os\nos.environ['X'] = 1\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("KDJAX_PLUGINS", "bad_plugin")
        return TEACHER + [w]
    if case == "evaluate into a teacher's workdir":
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "results.json").write_text(json.dumps({"task": "teacher"}))
        return ["evaluate", f"--config.checkpoint={tmp_path / 'w'}", w]
    if case == "teacher with NaN weights":
        teacher = _nan_teacher(tmp_path / "t")
        return ["evaluate", f"--config.checkpoint={teacher}", w]
    if case == "duplicate keys in a .pth":
        pth = _pth_with_duplicate_key(tmp_path / "dup.pth")
        return ["import_torch", "--config.model=resnet8", f"--config.source={pth}", w]
    if case == "full disk while writing metrics":
        from kdjax import runlog
        (tmp_path / "w").mkdir()
        os.symlink("/dev/full", tmp_path / "w" / "metrics.jsonl")  # every write fails with ENOSPC
        # (reading /dev/full never ends: the resume bookkeeping that reads the file back is skipped)
        monkeypatch.setattr(runlog.RunLog, "forget_after", lambda self, step: None)
        monkeypatch.setattr(runlog.RunLog, "evaluations", lambda self: [])
        return TEACHER + [w]
    if case == "unfinished teacher":
        save_model(str(tmp_path / "t" / "checkpoints"), {"params": {"w": np.ones(2, np.float32)}},
                   {"model": "tiny_cnn"})  # no results.json: its run has not finished
        return STUDENT[:1] + ["--config.teacher=tiny_cnn", "--config.student=tiny_cnn",
                              f"--config.teacher_checkpoint={tmp_path / 't'}", w]
    if case == "diverged float32 run":
        return TEACHER + ["--config.optim.lr=1e30", "--config.dtype=float32", w]
    raise AssertionError(case)


# case -> what the one line must say
CASES = {
    "negative lr": r"optim\.lr must be > 0, got -0\.1",
    "zero temperature": r"loss\.temperature must be > 0, got 0",
    "no test images": r"dataset_options\.num_test must be >= 1, got 0",
    "seed beyond any key": r"seed must be >= 0 and <= 9\.22337e\+18, got 1\.18059e\+21",
    "absurd image size": r"image_size must be >= 1 and <= 1024, got 10000",
    "epochs zero": r"epochs must be >= 1",
    "batch larger than the dataset": r"fewer than one batch of 128",
    "checkpoints is a file": r"checkpoints is a file, not a checkpoints folder",
    "malformed lock file": r"is in use by a process that is writing its lock file",
    "live lock holder": rf"is in use by PID {os.getppid()} on ",
    "config file raises on import": r"bad\.py raised RuntimeError on import: no such cluster",
    "get_config raises": r"get_config\(None\) of config file .*bad2\.py raised KeyError",
    "plugin raises on import": r"KDJAX_PLUGINS module 'bad_plugin' raised TypeError on import",
    "evaluate into a teacher's workdir": r"holds a teacher run; an evaluate run never writes into another task's",
    "teacher with NaN weights": r"non-finite values: params/fc/kernel \(1 NaN, 0 inf of 2\)",
    "duplicate keys in a .pth": r"sets the key 'fc\.weight' twice",
    "full disk while writing metrics": r"could not append to .*metrics\.jsonl .* at step \d+: free space",
    "unfinished teacher": r"the teacher run in .* is unfinished",
    "diverged float32 run": r"(loss became|non-finite).*; lower --config\.optim\.lr$",
}


def contradictions(line: str, config) -> list:
    """What a line says that cannot be true of the refusal it reports: placeholders where a value belongs, or a fix
    that is the run's own setting already (a float32 run told to "use dtype=float32")."""
    found = [word for word in ("PID None", "on None", "got None", "'None'") if word in line]
    for field, value in re.findall(r"(?:use|set) (?:--config\.)?([a-z_][\w.]*)=([^\s,;:)]+)", line):
        node = config
        for part in field.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is not None and str(node) == value:
            found.append(f"suggests {field}={value}, which the run already has")
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_refusal_is_one_line_that_says_what_to_fix(case, tmp_path, monkeypatch, capsys):
    argv = _setup(case, tmp_path, monkeypatch)
    try:
        config = cli.parse_args(argv).config
    except Exception:  # the refusal is in the command line itself
        config = None
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code in (1, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and len(err) == 1, err
    assert re.search(CASES[case], errors[0]), errors[0]
    assert not contradictions(errors[0], config), errors[0]


def test_a_distill_run_refuses_its_optimiser_fields_before_writing(tmp_path, capsys):
    """The run spec resolves the lr and the milestones at the checks: both milestone forms are refused before the
    data loads or anything is written (the run used to find them after claiming its workdir)."""
    workdir = tmp_path / "w"
    argv = STUDENT + ["--config.optim.decay_epochs=5", "--config.optim.decay_fractions=0.5", f"--workdir={workdir}"]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "set either optim.decay_fractions" in capsys.readouterr().err
    assert not workdir.exists()

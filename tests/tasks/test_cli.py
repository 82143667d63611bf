"""The command line (``kdjax``, ``python -m kdjax``, ``launch.py``): help, config sources, one-line errors."""
import subprocess
import sys

import pytest

from helpers import REPO, launch_env
from kdjax import cli, configs


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdjax", *args], cwd=cwd or REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_task_with_an_example():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for task, (line, _) in configs.TASKS.items():
        assert f"  {task}" in proc.stdout and line in proc.stdout
    assert "kdjax demo --workdir=runs/demo" in proc.stdout
    launch = subprocess.run([sys.executable, str(REPO / "launch.py"), "--help"], env=launch_env(),
                            capture_output=True, text=True, timeout=120)
    assert launch.returncode == 0 and launch.stdout == proc.stdout


@pytest.mark.parametrize("task", list(configs.TASKS))
def test_task_help_names_every_field_with_default_and_meaning(task):
    config = configs.task_config(task)
    text = cli.describe_fields(config, task)
    from kdjax.configs import fields
    missing = [path for path in _leaves(config) if not fields.help_for(path)]
    assert not missing, f"fields without help: {missing}"
    for path in _leaves(config):
        assert f"  {path} " in text


def _leaves(config, prefix=""):
    import ml_collections
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, prefix + key + ".")
        else:
            yield prefix + key


def test_overrides_reach_the_config_and_lists_are_comma_separated():
    inv = cli.parse_args(["sweep", "--config.seeds=0,1,2", "--config.pairs=resnet56:resnet20,vgg13:vgg8",
                          "--config.teacher_checkpoints.resnet56=/t", "--config.image_size=16", "--workdir=/w"])
    assert inv.config.seeds == (0, 1, 2) and inv.config.pairs == ("resnet56:resnet20", "vgg13:vgg8")
    assert inv.config.teacher_checkpoints.resnet56 == "/t" and inv.config.image_size == 16
    inv = cli.parse_args(["--config=configs/teacher.py:model=resnet8,epochs=3", "--config.optim.lr=0.2"])
    assert (inv.config.model, inv.config.epochs, inv.config.optim.lr, inv.task) == ("resnet8", 3, 0.2, "teacher")


@pytest.mark.parametrize("args, message", [
    (("teacher", "--config.epochz=3", "--workdir=w"), "unknown config field 'epochz'; did you mean 'epochs'?"),
    (("teacher", "--config.optim.learning_rate=3", "--workdir=w"), "did you mean 'optim.lr'?"),
    (("teacher", "--config.num_epochs=3", "--workdir=w"), "did you mean 'epochs'?"),
    (("teacher", "--config.optim.wd=0.1", "--workdir=w"), "did you mean 'optim.weight_decay'?"),
    (("teacher", "--config.epochs=three", "--workdir=w"), "epochs='three': expected int"),
    (("--config=nowhere.py", "--workdir=w"), "config file"),
    (("teachr", "--workdir=w"), "unknown task 'teachr'"),
    (("teacher",), "--workdir=DIR"),
    (("teacher", "--config.dataset_options=num_train=64", "--workdir=w"),
     "dataset_options is a group of fields: set them one by one, e.g. --config.dataset_options.num_classes"),
])
def test_every_command_line_mistake_is_one_line_with_status_2(tmp_path, args, message):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugins_that_do_not_import_are_one_line(tmp_path):
    env = dict(launch_env(), KDJAX_PLUGINS="no_such_module_here")
    proc = subprocess.run([sys.executable, "-m", "kdjax", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no_such_module_here" in proc.stderr


def test_the_repository_configs_are_doors_to_the_package_defaults():
    for task in configs.TASKS:
        from_file = configs.load(str(REPO / "configs" / f"{task}.py"))
        assert from_file.to_dict() == configs.task_config(task).to_dict(), task

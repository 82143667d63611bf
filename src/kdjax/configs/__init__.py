"""The tasks' default configs: ``kdjax.configs.<task>.get_config(arg)`` returns an ``ml_collections.ConfigDict``
whose ``task`` field names the task that runs it. ``load`` gives a task's defaults or a user's own config file
(the ``configs/*.py`` at the top of the repository are such files: copies to edit).
"""
import importlib
import importlib.util
import os

import ml_collections

from kdjax.configs.parse import ConfigError, apply_arg, set_field  # noqa: F401

# task -> (one line, an example); the order is the pipeline's.
TASKS = {
    "demo": ("the whole paper on the embedded digits data, in minutes (no download)",
             "kdjax demo --workdir=runs/demo"),
    "prepare_data": ("ImageNet / ImageNet-100 archives -> verified record shards for the streamed path",
                     "kdjax prepare_data --config.dataset=imagenet --config.manual_dir=DIR --workdir=runs/prep"),
    "teacher": ("train a teacher with cross-entropy",
                "kdjax teacher --config.model=resnet56 --workdir=runs/t_resnet56"),
    "import_torch": ("import a teacher of the original PyTorch code (.pth)",
                     "kdjax import_torch --config.model=resnet56 --config.source=ckpt_epoch_240.pth --workdir=runs/t"),
    "evaluate": ("test loss, top-1 and top-5 of a checkpoint",
                 "kdjax evaluate --config.checkpoint=runs/t_resnet56 --workdir=runs/eval"),
    "tstddev": ("T. stddev of a teacher under the nine schemes",
                "kdjax tstddev --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/tstd"),
    "distill": ("a KD student with one scheme (and a distiller)",
                "kdjax distill --config.aug=cutmix_pick_t --config.teacher_checkpoint=runs/t_resnet56 --workdir=runs/s"),
    "sweep": ("the paper's grid: pairs x schemes x seeds, T. stddev, report",
              "kdjax sweep --config.seeds=0,1,2 --workdir=runs/paper"),
    "report": ("tables, correlations and plots over a directory of results",
               "kdjax report --config.results_dir=runs/paper --workdir=runs/paper"),
    "augment_gallery": ("a PNG of every scheme on real images",
                        "kdjax augment_gallery --workdir=runs/gallery"),
}


def task_config(task: str, arg=None) -> ml_collections.ConfigDict:
    """The defaults of ``task`` (a name of ``TASKS``) with the colon argument ``arg`` applied."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(TASKS)} (`kdjax --help` describes them)")
    return importlib.import_module(f"kdjax.configs.{task}").get_config(arg)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def file_config(path: str, arg=None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a user's config file."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: give a path to a .py file with get_config(), or a "
                          f"task name ({', '.join(TASKS)})")
    spec = importlib.util.spec_from_file_location(f"kdjax_user_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} does not parse: line {e.lineno}: {e.msg}") from None
    except Exception as e:  # the file's own code failed: one line, not its traceback
        raise ConfigError(f"config file {path} raised {type(e).__name__} on import: {_first_line(e)}; fix the "
                          f"file (KDJAX_DEBUG=1 shows where)") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg)
    except Exception as e:
        raise ConfigError(f"get_config({arg!r}) of config file {path} raised {type(e).__name__}: {_first_line(e)}; "
                          f"fix the file (KDJAX_DEBUG=1 shows where)") from e
    if not isinstance(config, ml_collections.ConfigDict) or "task" not in config:
        raise ConfigError(f"get_config() of {path} must return an ml_collections.ConfigDict with a 'task' field")
    return config


def load(spec: str) -> ml_collections.ConfigDict:
    """``"teacher"``, ``"teacher:model=resnet8"``, ``"path/to/file.py"`` or ``"path/to/file.py:k=v,..."``."""
    name, _, arg = spec.partition(":")
    if name.endswith(".py") or os.sep in name:
        return file_config(name, arg or None)
    return task_config(name, arg or None)

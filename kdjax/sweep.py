"""Sweeps over teacher/student pairs x schemes x seeds (SPEC section 0), the T. stddev runs, then the report.

A sweep is planned as a list of ``Run``s in dependency order (teachers, teacher-only T. stddev, students, the
T. stddev of CutMixPick by student entropy, which scores with that pair's trained student) and executed by one of
two executors: in this process, one run after the other (no start-up per run: the tests and the demo), or as
``launch.py`` subprocesses, ``parallel`` at a time (several runs share one accelerator, each with a fraction of its
memory). A run whose ``results.json`` exists is skipped; an interrupted one resumes from its checkpoints.

Layout under the sweep's workdir (one dataset; with several, each gets ``<dataset>/`` with this inside):

    teachers/<teacher>/                         trained teachers (unless given as checkpoints)
    <teacher>-<student>/<aug>/seed<k>/          KD students (DESIGN's layout)
    tstddev/<teacher>/seed<k>/<aug>/            T. stddev of the teacher-only schemes (one run, all of them)
    tstddev/<teacher>-<student>/cutmix_pick_s/seed<k>/   T. stddev of CutMixPick (S. ent.) with that student
"""
import concurrent.futures
import dataclasses
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kdjax import augment, models

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BY_STUDENT = "cutmix_pick_s"

# The paper's nine pairs (scripts/S_test_loss_different_DA_*.sh).
PAPER_PAIRS = ("vgg13:vgg8", "vgg13:MobileNetV2", "resnet56:resnet20", "resnet56:ShuffleV2", "wrn_40_2:wrn_16_2",
               "wrn_40_2:vgg8", "resnet32x4:resnet8x4", "resnet32x4:ShuffleV2", "ResNet50:vgg8")


class SweepFailed(RuntimeError):
    """Some runs of a sweep failed (the others ran, and their results are kept)."""


@dataclasses.dataclass(frozen=True)
class Run:
    task: str                    # configs/<task>.py and kdjax.tasks.<task>
    workdir: str
    fields: Tuple[Tuple[str, Any], ...]  # config overrides, dotted names for nested fields ("optim.lr")
    stage: int                   # runs of a stage may run together; a stage starts when the previous one is done
    done_marker: str = "results.json"

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.workdir, self.done_marker))

    def describe(self) -> str:
        short = {k: v for k, v in self.fields if k in ("model", "teacher", "student", "aug", "seed", "dataset")}
        return f"{self.task} {' '.join(f'{k}={v}' for k, v in short.items())} -> {self.workdir}"


def split_list(text: str) -> List[str]:
    """Lists in a colon argument use '+' (',' separates the fields): "resnet56:resnet20+vgg13:vgg8"."""
    return [item.strip() for item in str(text).replace(",", "+").split("+") if item.strip()]


def parse_pairs(text: str) -> List[Tuple[str, str]]:
    pairs = []
    for item in split_list(text):
        if item.count(":") != 1:
            raise ValueError(f"pair {item!r} is not of the form teacher:student (pairs separated by '+')")
        teacher, student = item.split(":")
        models.check_name(teacher)
        models.check_name(student)
        pairs.append((teacher, student))
    if not pairs:
        raise ValueError("the sweep has no pairs: set pairs=teacher:student[+teacher:student...]")
    return pairs


def parse_schemes(text: str) -> List[str]:
    names = augment.names()[:9] if str(text) == "all" else split_list(text)
    for name in names:
        augment.check_name(name)
    return names


def parse_checkpoints(text: str) -> Dict[str, str]:
    """"resnet56=/path+vgg13=/path" -> {teacher: checkpoint}: teachers that need no training."""
    out = {}
    for item in split_list(text):
        if "=" not in item:
            raise ValueError(f"teacher checkpoint {item!r} is not of the form model=path")
        name, path = item.split("=", 1)
        models.check_name(name)
        out[name] = path
    return out


def plan(config, root: str) -> List[Run]:
    """Every run of the sweep, in dependency order (see the module docstring for the layout)."""
    pairs = parse_pairs(config.pairs)
    schemes = parse_schemes(config.augs)
    seeds = [int(s) for s in split_list(config.seeds)]
    given = parse_checkpoints(config.teacher_checkpoints)
    datasets = split_list(config.datasets)
    teachers = list(dict.fromkeys(t for t, _ in pairs))
    common = {k: config[k] for k in ("batch_size", "dtype", "image_size", "data_dir", "manual_dir", "dataset_options")
              if k in config}
    train_common = dict(common, **{k: config[k] for k in ("steps_per_dispatch", "last_batch", "eval_every",
                                                         "epoch_factor") if k in config})
    runs: List[Run] = []
    for dataset in datasets:
        base = root if len(datasets) == 1 else os.path.join(root, dataset)
        teacher_ckpt = {}
        for teacher in teachers:
            if teacher in given:
                teacher_ckpt[teacher] = given[teacher]
                continue
            workdir = os.path.join(base, "teachers", teacher)
            teacher_ckpt[teacher] = workdir
            runs.append(Run("teacher", workdir, run_fields(train_common, model=teacher, dataset=dataset,
                                                        epochs=config.teacher_epochs, seed=0), stage=0))
        teacher_only = [s for s in schemes if s != BY_STUDENT]
        all_at_once = set(teacher_only) == set(augment.names()[:9]) - {BY_STUDENT}
        for teacher in teachers:
            for seed in seeds:
                workdir = os.path.join(base, "tstddev", teacher, f"seed{seed}")
                fields = dict(common, teacher=teacher, dataset=dataset, seed=seed,
                              teacher_checkpoint=teacher_ckpt[teacher], epochs=config.tstddev_epochs)
                if all_at_once:  # one program for the eight teacher-only schemes, one base batch stream
                    runs.append(Run("tstddev", workdir, run_fields(fields, aug="all"), stage=1,
                                    done_marker="tstddev.md"))
                    continue
                for aug in teacher_only:
                    runs.append(Run("tstddev", os.path.join(workdir, aug), run_fields(fields, aug=aug), stage=1))
        for teacher, student in pairs:
            for aug in schemes:
                for seed in seeds:
                    runs.append(Run("distill", os.path.join(base, f"{teacher}-{student}", aug, f"seed{seed}"),
                                    run_fields(train_common, teacher=teacher, student=student, dataset=dataset, aug=aug,
                                            seed=seed, epochs=config.epochs, teacher_checkpoint=teacher_ckpt[teacher]),
                                    stage=2))
        if BY_STUDENT in schemes:
            for teacher, student in pairs:
                for seed in seeds:
                    runs.append(Run("tstddev", os.path.join(base, "tstddev", f"{teacher}-{student}", BY_STUDENT,
                                                            f"seed{seed}"),
                                    run_fields(common, teacher=teacher, student=student, dataset=dataset, seed=seed,
                                            aug=BY_STUDENT, teacher_checkpoint=teacher_ckpt[teacher],
                                            student_checkpoint=os.path.join(base, f"{teacher}-{student}", BY_STUDENT,
                                                                            f"seed{seed}"),
                                            epochs=config.tstddev_epochs), stage=3))
    return runs


def run_fields(common: Dict[str, Any], **fields) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted(dict(common, **fields).items()))


def load_config(task: str):
    path = CONFIGS / f"{task}.py"
    spec = importlib.util.spec_from_file_location(f"kdjax_config_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


def build_config(run: Run):
    """The run's ConfigDict: its task's defaults with the run's fields set (fields a task lacks are skipped)."""
    config = load_config(run.task)
    for name, value in run.fields:
        node = config
        parts = name.split(".")
        for part in parts[:-1]:
            node = node[part]
        if parts[-1] in node:
            node[parts[-1]] = value
    return config


def command_line(run: Run) -> List[str]:
    config = build_config(run)
    args = [sys.executable, str(REPO / "launch.py"), f"--config={CONFIGS / (run.task + '.py')}",
            f"--workdir={run.workdir}"]
    for name, value in run.fields:
        top = name.split(".")[0]
        if top in config:
            args.append(f"--config.{name}={value}")
    return args


def run_in_process(run: Run) -> Dict[str, Any]:
    task = importlib.import_module(f"kdjax.tasks.{run.task}")
    os.makedirs(run.workdir, exist_ok=True)
    return task.run(build_config(run), run.workdir)


def run_subprocess(run: Run, memory_fraction: Optional[float]) -> int:
    env = dict(os.environ)
    if memory_fraction:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{memory_fraction:.3f}"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.makedirs(run.workdir, exist_ok=True)
    with open(os.path.join(run.workdir, "launch.log"), "a") as log:
        return subprocess.call(command_line(run), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def execute(runs: Sequence[Run], parallel: int = 1, log=print) -> List[Run]:
    """Run every unfinished run, stage by stage; returns the runs that failed (a failure does not stop the
    others, and the next stage's runs that depend on a failed one fail on their own missing inputs)."""
    failed: List[Run] = []
    todo = [r for r in runs if not r.done]
    log(f"[sweep] {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to go "
        f"({'in this process' if parallel <= 1 else f'{parallel} processes at a time'})")
    for stage in sorted({r.stage for r in todo}):
        batch = [r for r in todo if r.stage == stage]
        if parallel <= 1:
            for i, run in enumerate(batch):
                log(f"[sweep] stage {stage} run {i + 1}/{len(batch)}: {run.describe()}")
                try:
                    run_in_process(run)
                except Exception as e:  # one failed run must not lose the others; reported at the end
                    log(f"[sweep] FAILED: {run.describe()}: {type(e).__name__}: {e}")
                    failed.append(run)
            continue
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            codes = pool.map(lambda r: (r, run_subprocess(r, 0.9 / parallel)), batch)
            for run, code in codes:
                log(f"[sweep] {'done' if code == 0 else f'FAILED ({code})'}: {run.describe()}")
                if code:
                    failed.append(run)
    return failed

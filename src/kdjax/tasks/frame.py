"""The one frame every task runs in, in this order:

1. ``check(config) -> plan``: every name, field and checkpoint meta, before anything is loaded or written; the plan
   is the run resolved from the config (into which a resumed workdir's recorded absolute milestones are adopted
   first), what the library reads instead of the config;
2. a run that finished with this same config is answered from its results.json;
3. the workdir is checked writable and locked (one process at a time);
4. ``load(config, plan) -> inputs``: checkpoints and data, checked against each other;
5. the workdir is claimed (its config and the inputs it consumes recorded, or checked equal to the recorded
   ones): only now, after every check that can refuse the launch, is anything written;
6. ``run(config, workdir, inputs) -> Outcome``: the library call;
7. the outcome's results.json files are written (atomically, last: they mark the run finished) and its line printed.

A task module is then a ``Task`` built from three small functions, and ``run(config, workdir)`` runs it here.
"""
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from kdjax import parallel, runlog, workdir as workdir_lib


@dataclasses.dataclass
class Outcome:
    """What a task's ``run`` produced: ``results`` for ``<workdir>/results.json`` (None when the results are
    ``parts`` only), ``parts`` for results.json files in sub-directories (tstddev's schemes), the closing ``line``
    and the value the task returns (default: ``results``)."""
    results: Optional[Dict[str, Any]]
    line: str
    parts: Sequence[Tuple[str, Dict[str, Any]]] = ()
    returned: Any = None


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    check: Callable[[Any], Any]
    load: Callable[[Any, Any], Any]
    run: Callable[[Any, str, Any], Outcome]
    # config fields a rerun in the same workdir may change without changing its results
    claim_ignore: Tuple[str, ...] = workdir_lib.RESUMABLE_FIELDS
    # (config, inputs) -> {role: checkpoint.input_record}: what the run consumes; a resume must consume the same
    consumed: Optional[Callable[[Any, Any], Dict[str, Any]]] = None


def already_finished(task: str, workdir: str, config) -> Optional[Dict[str, Any]]:
    """The results of a finished run of this same config in ``workdir`` (printed), else None."""
    results = workdir_lib.finished_results(workdir, config)
    if results is None:
        return None
    best = (f" (best top1 {results['best_top1']:.4f} at epoch {results['best_epoch']})"
            if "best_top1" in results else "")
    figures = (f"T. stddev {results['tstddev']:.6f}" if "tstddev" in results else
               f"test_loss {results.get('test_loss', float('nan')):.4f} top1 {results.get('top1', float('nan')):.4f}")
    print(f"[{task}] already finished: {figures}{best}; results in {os.path.join(workdir, 'results.json')}",
          flush=True)
    return results


def run_frame(task: Task, config, workdir: str):
    workdir_lib.check_owner(workdir, task.name)  # never into another task's workdir (a teacher's, for evaluate)
    workdir_lib.adopt_recorded_schedule(workdir, config)  # before the checks resolve the run from the config
    plan = task.check(config)
    done = already_finished(task.name, workdir, config)
    if done is not None:
        return done
    workdir_lib.check_writable(workdir)
    with workdir_lib.WorkdirLock(workdir):
        started = time.time()
        parallel.enable_compilation_cache(config.get("compile_cache_dir"))
        cache_before, compiles_before = parallel.compilation_cache_counts(), parallel.count_compiles()
        inputs = task.load(config, plan)
        consumed = task.consumed(config, inputs) if task.consumed is not None else None
        workdir_lib.claim(workdir, config, ignore=task.claim_ignore, inputs=consumed)
        parallel.wait_for_all_processes("run")  # the processes of a multi-host run start its work together
        outcome = task.run(config, workdir, inputs)
        compiled = parallel.compiles_since(compiles_before)
        timing = {"wall_s": time.time() - started, "compile_s": compiled["compile_s"],
                  "programs": compiled["programs"],
                  "compile_cache": parallel.compilation_cache_counts_since(cache_before)}
        path = workdir
        for directory, results in outcome.parts:
            runlog.write_results(directory, {**results, **timing}, config)
        if outcome.results is not None:
            outcome.results.update(timing)
            path = runlog.write_results(workdir, outcome.results, config)
    print(f"{outcome.line}; {compiled['programs']} programs compiled in {compiled['compile_s']:.1f} s; results in "
          f"{path}", flush=True)
    return outcome.results if outcome.returned is None else outcome.returned


def training_results(out: Dict[str, Any]) -> Dict[str, Any]:
    """The results.json fields every training run shares, from a training run's output (``loop.fit``'s, with its
    ``recipe`` and ``seed``)."""
    recipe = out["recipe"]
    return {"seed": out["seed"], "epochs": recipe.epochs, "test_loss": out["test_loss"], "top1": out["top1"],
            "top5": out["top5"], "best_top1": out["best_top1"], "best_epoch": out["best_epoch"],
            "best_test_loss": out["best_test_loss"], "images_per_s": out["images_per_s"],
            "lr": recipe.base_lr, "decay_epochs": list(recipe.decay_epochs)}  # compile_s: the frame's timing


def training_line(task: str, label: str, dataset: str, out: Dict[str, Any]) -> str:
    return f"[{task}] {label} on {dataset}: test_loss {out['test_loss']:.4f} top1 {out['top1']:.4f}"

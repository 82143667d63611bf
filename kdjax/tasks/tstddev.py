"""Task 'tstddev': T. stddev and mean entropy of a teacher under one scheme or all nine (docs/fidelity.md, "T. stddev").

Checks every name, field and checkpoint before loading data or compiling; then runs ``kdjax.tstddev.evaluator``:
progress lines per dispatch, the original's ``Check T prob: ...`` line per scheme at every epoch end, and
``results.json`` per scheme plus a Markdown table ``tstddev.md``.

The T. stddev standard error (``tstddev_se``) is the estimator's delete-a-bucket jackknife over groups (see
``kdjax.tstddev``); the paper reports none.
"""
import os
import time
from typing import List, Optional


from kdjax import augment, models, parallel, runlog, workdir as workdir_lib
from kdjax.augment import transforms
from kdjax.data import DeviceDataset
from kdjax.tasks import common
from kdjax.tstddev import Evaluator, make_plan

ALL = "all"
BY_STUDENT = "cutmix_pick_s"
STUDENT_HINT = ("--config.student_checkpoint=DIR (a trained student's workdir or checkpoint, e.g. the KD + "
                "CutMixPick student of configs/distill.py; student=<model> if its checkpoint does not name it)")


def scheme_names(config) -> List[str]:
    """The schemes this run evaluates; CutMixPick (S. ent.) is left out of ``all`` when no student is given."""
    if config.aug == ALL:
        return [name for name in augment.PAPER_SCHEMES
                if config.student_checkpoint or augment.scorer_of(name) != "student"]
    augment.check_name(config.aug)
    return [config.aug]


def validate(config) -> None:
    """Every name and required field, before any checkpoint, data or compile."""
    models.check_name(config.teacher)
    if config.aug != ALL:
        try:
            augment.check_name(config.aug)
        except ValueError as e:
            raise ValueError(f"{e}, or '{ALL}' for the nine") from None
    common.validate_run(config, config.teacher)
    if not config.teacher_checkpoint:
        raise ValueError(f"teacher={config.teacher} needs --config.teacher_checkpoint=DIR (a workdir of "
                         f"configs/teacher.py or a checkpoint written by configs/import_torch.py)")
    if config.aug == BY_STUDENT and not config.student_checkpoint:
        raise ValueError(f"aug={BY_STUDENT} picks by the entropy of a fixed student: set {STUDENT_HINT}")
    if config.student:
        models.check_name(config.student)
    if int(config.augment.mix_n_run) < 2:
        raise ValueError(f"augment.mix_n_run must be >= 2 (CutMixPick picks from several CutMix draws), got "
                         f"{config.augment.mix_n_run}")


def _row(name: str, r: dict) -> str:
    return (f"| {name} | {r['tstddev']:.6f} | {r['tstddev_se']:.6f} | {r['groups']} | {r['mean_entropy']:.6f} |")


def markdown_table(teacher: str, dataset: str, results: dict, student: Optional[str] = None,
                   skipped: Optional[List[str]] = None) -> str:
    head = f"T. stddev of {teacher} on {dataset}" + (f" (CutMixPick S. ent. scored by {student})" if student else "")
    lines = [f"## {head}", "", "| aug | T. stddev | s.e. (jackknife) | groups | mean entropy |",
             "|---|---|---|---|---|"]
    lines += [_row(name, r) for name, r in results.items()]
    for name in skipped or []:
        lines.append(f"| {name} | skipped: no student_checkpoint | | | |")
    return "\n".join(lines) + "\n"


def run(config, workdir):
    validate(config)
    return common.run_once("tstddev", workdir, config, _evaluate)


def _evaluate(config, workdir):
    names = scheme_names(config)
    skipped = [BY_STUDENT] if config.aug == ALL and BY_STUDENT not in names else []
    if skipped and config.get("note_skipped", True):
        message = (f"aug=all without a student checkpoint: {BY_STUDENT} is skipped (it scores by a fixed student's "
                   f"entropy); to include it set {STUDENT_HINT}")
        print(f"[tstddev] note: {message}", flush=True)
    teacher_vars, teacher_meta, _ = common.load_checkpoint(config.teacher_checkpoint, config.teacher, "teacher")
    student_vars, student_meta, student_name = None, None, None
    if BY_STUDENT in names:
        student_vars, student_meta, student_name = common.load_checkpoint(config.student_checkpoint,
                                                                    config.student or None, "student")
    common.resolve_data(config, teacher_meta)
    started = time.time()
    cache_before = common.start_compilation_cache(config)
    dataset = common.load_dataset(config)
    for meta, path in ((teacher_meta, config.teacher_checkpoint), (student_meta, config.student_checkpoint)):
        if meta is not None:
            common.check_against_dataset(meta, path, dataset)
    # Dispatch layout changes the run's speed, not its values: a rerun in the same workdir may change it.
    inputs = {role: common.input_record(path, meta) for role, path, meta in
              (("teacher", config.teacher_checkpoint, teacher_meta), ("student", config.student_checkpoint,
                                                                     student_meta)) if meta is not None}
    workdir_lib.claim(workdir, config, ignore=workdir_lib.RESUMABLE_FIELDS + ("steps_per_forward",), inputs=inputs)
    dtype = common.compute_dtype(config.dtype)
    batch = int(config.batch_size)
    steps_per_dispatch = parallel.steps_per_dispatch(config.steps_per_dispatch, unit=config.steps_per_forward)
    plan = make_plan(dataset.num_train, batch, int(config.epochs), steps_per_dispatch, int(config.steps_per_forward))
    n_pick = config.augment.n_pick if config.augment.n_pick is not None else batch
    schemes = [augment.create(name, dataset_stats=dataset, per_sample=bool(config.augment.per_sample),
                              mix_n_run=int(config.augment.mix_n_run), n_pick=int(n_pick), criterion="entropy")
               for name in names]
    teacher = models.create(config.teacher, dataset.num_classes, dataset.image_size, dtype)
    student = (models.create(student_name, dataset.num_classes, dataset.image_size, dtype)
               if student_name else None)
    evaluator = Evaluator(teacher, schemes, dataset.num_classes, plan, dataset.mean, dataset.std,
                          transforms.default_pad(dataset.image_size), student=student,
                          float32_exact=config.dtype == "float32")
    mesh = parallel.make_mesh()
    data = DeviceDataset.create(dataset, mesh)
    print(f"[tstddev] {config.teacher} on {dataset.name}: {len(names)} scheme(s), {plan.epochs} epochs x "
          f"{plan.steps_per_epoch} steps (short batch {plan.short_batch}), {plan.expected_groups()} groups; "
          f"compiling", flush=True)
    compile_s = evaluator.compile(teacher_vars, data, student_vars, int(config.seed))
    print(f"[tstddev] compiled in {compile_s:.1f} s; {evaluator.teacher_rows_per_step()} teacher rows per step",
          flush=True)

    last_print = [0.0]

    def on_chunk(r):
        """One throttled progress line (at most one per 5 s, and one per epoch end), as training prints; the
        original's per-scheme 'Check T prob' lines only with verbose."""
        now = time.time()
        if r.epoch_end or now - last_print[0] >= 5.0:
            last_print[0] = now
            print(f"[tstddev] epoch {r.epoch}/{plan.epochs} step {r.global_step}/{r.total_steps} groups "
                  f"{r.groups[0]} | {r.images_per_s:,.0f} teacher img/s ETA {runlog.format_eta(r.eta_s)}", flush=True)
        if r.epoch_end and config.get("verbose", False):
            for n, g, v, h in zip(names, r.groups, r.tstddev, r.mean_entropy):
                print(f"[tstddev:{n}] Check T prob: NumOfSampledStd {g} Epoch {r.epoch} Step "
                      f"{plan.steps_per_epoch - 1} TotalStep {r.global_step - 1} MeanStd {v:.6f} MeanEntropy "
                      f"{h:.6f}", flush=True)

    out = evaluator.run(teacher_vars, data, student_vars=student_vars, seed=int(config.seed), on_chunk=on_chunk)
    wall_s = time.time() - started
    all_results = {}
    for name in names:
        r = out["results"][name]
        results = {"task": "tstddev", "teacher": config.teacher, "dataset": dataset.name, "aug": name,
                   "seed": int(config.seed), "epochs": plan.epochs, **r, "wall_s": wall_s,
                   "eval_s": out["eval_s"], "compile_s": out["compile_s"], "images_per_s": out["images_per_s"],
                   "schemes_in_run": len(names), "dtype": config.dtype,
                   "inputs": {"teacher": common.input_record(config.teacher_checkpoint, teacher_meta)},
                   "compile_cache": common.cache_counts_since(cache_before)}
        if name == BY_STUDENT:
            results["student"] = student_name
            results["student_checkpoint"] = config.student_checkpoint
            results["inputs"]["student"] = common.input_record(config.student_checkpoint, student_meta)
        directory = workdir if config.aug != ALL else os.path.join(workdir, name)
        os.makedirs(directory, exist_ok=True)
        runlog.write_results(directory, results, config)
        all_results[name] = r
    table = markdown_table(config.teacher, dataset.name, all_results, student_name,
                           skipped if config.get("note_skipped", True) else [])
    if runlog.is_main_process():
        with open(os.path.join(workdir, "tstddev.md"), "w") as f:
            f.write(table)
    print(table, flush=True)
    print(f"[tstddev] {out['steps']} steps in {out['eval_s']:.1f} s ({out['images_per_s']:,.0f} teacher img/s) "
          f"after {out['compile_s']:.1f} s of compiling; results in {workdir}", flush=True)
    return all_results

"""Task 'tstddev': T. stddev and mean entropy of a teacher under one scheme or all nine (docs/fidelity.md, "T. stddev"),
and beside them the teacher-side metrics on x' (ECE, class-histogram entropy, student agreement: "Teacher-side
metrics").

Checks every name, field and checkpoint before loading data or compiling; then runs ``kdjax.tstddev.evaluator``:
progress lines per dispatch, the original's ``Check T prob: ...`` line per scheme at every epoch end, and
``results.json`` per scheme plus a Markdown table ``tstddev.md``.

The T. stddev standard error (``tstddev_se``) is the estimator's delete-a-bucket jackknife over groups (see
``kdjax.tstddev``); the paper reports none.
"""
import dataclasses
import os
from typing import Any, List, Optional

from kdjax import augment, models, parallel, runlog, workdir as workdir_lib
from kdjax.augment import transforms
from kdjax.checkpoint import (check_against_dataset, fill_data_fields, fill_model_field, input_record,
                              load_checkpoint, read_meta)
from kdjax.data import is_streamed, open_for, place
from kdjax.tasks import frame
from kdjax.train import recipe as recipe_lib
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


def check(config) -> None:
    """Every name and required field, before any checkpoint, data or compile (an unset ``teacher`` is the
    architecture its checkpoint's meta names)."""
    fill_model_field(config, "teacher", "teacher_checkpoint")
    models.check_name(config.teacher)
    if config.aug != ALL:
        try:
            augment.check_name(config.aug)
        except ValueError as e:
            raise ValueError(f"{e}, or '{ALL}' for the nine") from None
    recipe_lib.validate_run(config, config.teacher)
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
    fill_data_fields(config, read_meta(config.teacher_checkpoint))
    recipe_lib.check_streamed_fields(config)


def _row(name: str, r: dict) -> str:
    agreement = "–" if r.get("agreement") is None else f"{r['agreement']:.4f}"
    return (f"| {name} | {r['tstddev']:.6f} | {r['tstddev_se']:.6f} | {r['groups']} | {r['mean_entropy']:.6f} | "
            f"{r['ece']:.6f} | {r['class_histogram_entropy']:.6f} | {agreement} | {r['aug_top1']:.4f} |")


def markdown_table(teacher: str, dataset: str, results: dict, student: Optional[str] = None,
                   skipped: Optional[List[str]] = None) -> str:
    """The T. stddev columns, then the teacher-side metrics on x' (``kdjax.tstddev.teacher_metrics``)."""
    head = f"T. stddev of {teacher} on {dataset}" + (f" (CutMixPick S. ent. scored by {student})" if student else "")
    lines = [f"## {head}", "", "| aug | T. stddev | s.e. (jackknife) | groups | mean entropy | ECE (x') | "
             "class-histogram entropy | S-T agreement | T. top-1 (x') |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(name, r) for name, r in results.items()]
    for name in skipped or []:
        lines.append(f"| {name} | skipped: no student_checkpoint | | | | | | | |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Inputs:
    names: List[str]
    skipped: List[str]
    teacher_vars: Any
    teacher_meta: dict
    dataset: Any
    student_vars: Any = None
    student_meta: Optional[dict] = None
    student_name: Optional[str] = None


def load(config, _) -> Inputs:
    names = scheme_names(config)
    skipped = [BY_STUDENT] if config.aug == ALL and BY_STUDENT not in names else []
    if skipped and config.get("note_skipped", True):
        message = (f"aug=all without a student checkpoint: {BY_STUDENT} is skipped (it scores by a fixed student's "
                   f"entropy); to include it set {STUDENT_HINT}")
        print(f"[tstddev] note: {message}", flush=True)
    teacher_vars, teacher_meta, _ = load_checkpoint(config.teacher_checkpoint, config.teacher, "teacher")
    inputs = Inputs(names, skipped, teacher_vars, teacher_meta, None)
    if BY_STUDENT in names:
        inputs.student_vars, inputs.student_meta, inputs.student_name = load_checkpoint(
            config.student_checkpoint, config.student or None, "student")
    inputs.dataset = open_for(config)  # ImageNet / ImageNet-100: the streamed source
    for meta, path in ((teacher_meta, config.teacher_checkpoint), (inputs.student_meta, config.student_checkpoint)):
        if meta is not None:
            check_against_dataset(meta, path, inputs.dataset)
    return inputs


def consumed(config, inputs: Inputs) -> dict:
    """The teacher, and the student that scores CutMixPick (S. ent.) when there is one."""
    records = {"teacher": input_record(config.teacher_checkpoint, inputs.teacher_meta)}
    if inputs.student_meta is not None:
        records["student"] = input_record(config.student_checkpoint, inputs.student_meta)
    return records


def run_tstddev(config, workdir, inputs: Inputs):
    names, dataset = inputs.names, inputs.dataset
    dtype = recipe_lib.compute_dtype(config.dtype)
    batch = int(config.batch_size)
    steps_per_dispatch = parallel.steps_per_dispatch(config.steps_per_dispatch, unit=config.steps_per_forward)
    plan = make_plan(dataset.num_train, batch, int(config.epochs), steps_per_dispatch, int(config.steps_per_forward))
    options = augment.options_from_config(config.augment, batch)
    schemes = [augment.create(name, dataset_stats=dataset, **options, criterion="entropy") for name in names]
    teacher = models.create(config.teacher, dataset.num_classes, dataset.image_size, dtype)
    student = (models.create(inputs.student_name, dataset.num_classes, dataset.image_size, dtype)
               if inputs.student_name else None)
    evaluator = Evaluator(teacher, schemes, dataset.num_classes, plan, dataset.mean, dataset.std,
                          transforms.default_pad(dataset.image_size), student=student,
                          float32_exact=config.dtype == "float32", host_crop=is_streamed(dataset))
    mesh = parallel.make_mesh()
    data = place(dataset, mesh)
    log = runlog.ProgressLog("tstddev")
    where = " (streamed)" if is_streamed(dataset) else ""
    log.line(f"{config.teacher} on {dataset.name}{where}, {runlog.devices_line(mesh.size)}: {len(names)} scheme(s), "
             f"{plan.epochs} epochs x "
             f"{plan.steps_per_epoch} steps (short batch {plan.short_batch}), {plan.expected_groups()} groups; "
             f"compiling")
    compile_s = evaluator.compile(inputs.teacher_vars, data, inputs.student_vars, int(config.seed), mesh)
    log.line(f"compiled in {compile_s:.1f} s; {evaluator.teacher_rows_per_step()} teacher rows per step")

    def on_chunk(r):
        """One throttled progress line, as training prints; the original's per-scheme 'Check T prob' lines only
        with verbose."""
        log.progress(f"epoch {r.epoch}/{plan.epochs} step {r.global_step}/{r.total_steps} groups {r.groups[0]} | "
                     f"{r.images_per_s:,.0f} teacher img/s ETA {runlog.format_eta(r.eta_s)}", force=r.epoch_end)
        if r.epoch_end and config.get("verbose", False):
            for n, g, v, h in zip(names, r.groups, r.tstddev, r.mean_entropy):
                log.line(f"Check T prob: NumOfSampledStd {g} Epoch {r.epoch} Step {plan.steps_per_epoch - 1} "
                         f"TotalStep {r.global_step - 1} MeanStd {v:.6f} MeanEntropy {h:.6f}", tag=f"tstddev:{n}")

    out = evaluator.run(inputs.teacher_vars, data, student_vars=inputs.student_vars, seed=int(config.seed),
                        on_chunk=on_chunk, mesh=mesh)
    parts, all_results = [], {}
    records = consumed(config, inputs)  # the student scores CutMixPick (S. ent.) only: the other schemes' inputs
    teacher_only = {role: r for role, r in records.items() if role != "student"}  # are the teacher alone
    for name in names:
        r = out["results"][name]
        results = {"task": "tstddev", "teacher": config.teacher, "dataset": dataset.name, "aug": name,
                   "seed": int(config.seed), "epochs": plan.epochs, **r,
                   "eval_s": out["eval_s"], "images_per_s": out["images_per_s"],  # compile_s: the frame's
                   "schemes_in_run": len(names), "dtype": config.dtype,
                   "inputs": dict(records if name == BY_STUDENT else teacher_only)}
        if name == BY_STUDENT:
            results["student"] = inputs.student_name
            results["student_checkpoint"] = config.student_checkpoint
        parts.append((workdir if config.aug != ALL else os.path.join(workdir, name), results))
        all_results[name] = r
    table = markdown_table(config.teacher, dataset.name, all_results, inputs.student_name,
                           inputs.skipped if config.get("note_skipped", True) else [])
    if runlog.is_main_process():
        with open(os.path.join(workdir, "tstddev.md"), "w") as f:
            f.write(table)
    print(table, flush=True)
    line = f"[tstddev] {out['steps']} steps in {out['eval_s']:.1f} s ({out['images_per_s']:,.0f} teacher img/s)"
    return frame.Outcome(None, line, parts=parts, returned=all_results)


# Dispatch layout changes the run's speed, not its values: a rerun in the same workdir may change it.
TASK = frame.Task("tstddev", check, load, run_tstddev,
                  claim_ignore=workdir_lib.RESUMABLE_FIELDS + ("steps_per_forward",), consumed=consumed)


def run(config, workdir):
    return frame.run_frame(TASK, config, workdir)

"""The sweep's grid: distillers x teacher/student pairs x schemes x seeds, planned as ``Run``s in dependency order.

Stages: teachers (unless given as checkpoints), teacher-only T. stddev, students (one per distiller, pair, scheme
and seed), then the T. stddev of the schemes scored by the student (CutMixPick S. ent.), which scores with that
pair's trained student: the ``kd`` student when ``kd`` is among the distillers, else the first distiller's.
Teachers and T. stddev runs are shared by the distillers.

Layout under the sweep's workdir (one dataset; with several, each gets ``<dataset>/`` with this inside):

    teachers/<teacher>/                         trained teachers (unless given as checkpoints)
    <teacher>-<student>/<aug>/seed<k>/          KD students (distiller kd)
    <distiller>/<teacher>-<student>/<aug>/seed<k>/   students of another distiller (crd/, crd_kd/ for crd+kd, ...)
    tstddev/<teacher>/seed<k>/<aug>/            T. stddev of the teacher-only schemes (one run, all of them)
    tstddev/<teacher>-<student>/cutmix_pick_s/seed<k>/   T. stddev of CutMixPick (S. ent.) with that student
                                                (tstddev/<distiller>/<teacher>-<student>/... when it is not kd's)
"""
import dataclasses
import os
from typing import Any, Dict, List, NamedTuple, Tuple


from kdjax import augment, distillers as distillers_lib, models
from kdjax.augment import switch as augment_switch
from kdjax.configs.sweep import COMMON_FIELDS, PAPER_PAIRS, TRAIN_FIELDS  # noqa: F401

ALL = "all"


@dataclasses.dataclass(frozen=True)
class Run:
    task: str                    # kdjax.configs.<task> and kdjax.tasks.<task>
    workdir: str
    fields: Tuple[Tuple[str, Any], ...]  # config overrides, dotted names for nested fields ("optim.lr")
    stage: int                   # runs of a stage may run together; a stage starts when the previous one is done
    done_marker: str = "results.json"

    @property
    def done(self) -> bool:
        return os.path.exists(os.path.join(self.workdir, self.done_marker))

    def describe(self) -> str:
        short = {k: v for k, v in self.fields if k in ("model", "teacher", "student", "aug", "seed", "dataset")}
        if self.task == "distill":  # every student run names its distiller, kd included
            given = dict(self.fields)
            short["distiller"] = distiller_label(given.get("distiller", "kd"), bool(given.get("distill.with_kd")),
                                                 given.get("ctkd.mode") == CTKD_MODE)
            short = dict(sorted(short.items()))
        return f"{self.task} {' '.join(f'{k}={v}' for k, v in short.items())} -> {self.workdir}"


def parse_pairs(pairs) -> List[Tuple[str, str]]:
    out = []
    for item in pairs:
        if str(item).count(":") != 1:
            raise ValueError(f"pair {item!r} is not of the form teacher:student (e.g. --config.pairs="
                             f"resnet56:resnet20,vgg13:vgg8)")
        teacher, student = item.split(":")
        models.check_name(teacher)
        models.check_name(student)
        out.append((teacher, student))
    if not out:
        raise ValueError("the sweep has no pairs: set --config.pairs=teacher:student[,teacher:student...]")
    return out


def parse_schemes(augs) -> List[str]:
    names = list(augment.PAPER_SCHEMES) if tuple(augs) == (ALL,) else list(augs)
    for name in names:
        augment.check_name(name)
    return names


WITH_KD = "+kd"   # the "+KD" variant of a distiller beside KD (distill.with_kd=true), e.g. crd+kd
WITH_CTKD = "+ctkd"   # CTKD's learned temperature on the run's logit terms (ctkd.mode=global), e.g. kd+ctkd


def distiller_label(name: str, with_kd: bool, ctkd: bool = False) -> str:
    """``crd`` / ``crd+kd`` / ``dkd+ctkd``: the distiller as the sweep, the report and the listings name it."""
    return name + (WITH_KD if with_kd else "") + (WITH_CTKD if ctkd else "")


CTKD_MODE = "global"
# In a path, and accepted as input where "+" joins list items (the colon argument), "_" stands for "+".
PATH_JOIN = "_"


class Method(NamedTuple):
    """One entry of the sweep's distiller axis: a canonical distiller name, its "+KD" variant, CTKD's plug-in."""
    name: str
    with_kd: bool = False
    ctkd: bool = False

    @property
    def label(self) -> str:
        return distiller_label(self.name, self.with_kd, self.ctkd)

    def fields(self) -> Dict[str, Any]:
        """The distill config fields of this method's runs (kd's carry none: the sweeps before the axis)."""
        out: Dict[str, Any] = {} if self.name == "kd" else {"distiller": self.name}
        if self.with_kd:
            out["distill.with_kd"] = True
        if self.ctkd:
            out["ctkd.mode"] = CTKD_MODE
        return out


def distiller_dir(label: str) -> str:
    """The path component of a distiller's students: ``crd``, ``crd_kd`` for crd+kd, ``kd_ctkd`` for kd+ctkd."""
    return label.replace("+", PATH_JOIN)


def _with_kd_names():
    """The distillers with a "+KD" variant: all but kd itself and the logit distillers, which replace KD's terms."""
    logit = set(distillers_lib.logit_names())
    return [n for n in distillers_lib.names() if n != "kd" and n not in logit]


def _distiller_choices() -> str:
    aliases = [f"{a} ({c})" for a, c in sorted(distillers_lib.ALIASES.items()) if c in distillers_lib.names()]
    return (f"valid: {', '.join(distillers_lib.names())}"
            + (f" (aliases: {', '.join(aliases)})" if aliases else "")
            + f"; {WITH_KD} after one of {', '.join(_with_kd_names())} gives its '+KD' variant, "
              f"e.g. crd{WITH_KD}; {WITH_CTKD} last learns the temperature of the KD or DKD terms, e.g. "
              f"kd{WITH_CTKD}, dkd{WITH_CTKD}, crd{WITH_KD}{WITH_CTKD}")


def _strip_suffix(text: str, suffix: str) -> Tuple[str, bool]:
    """``text`` without ``suffix`` (or its path spelling), and whether it had it; a registered name that merely
    ends like the suffix stays that name."""
    for spelling in (suffix, suffix.replace("+", PATH_JOIN)):
        if text.endswith(spelling) and distillers_lib.ALIASES.get(text, text) not in distillers_lib.names():
            return text[:-len(spelling)], True
    return text, False


def _check_ctkd(name: str, text: str) -> None:
    from kdjax.distillers import ctkd as ctkd_lib
    try:
        ctkd_lib.check_ctkd(ctkd_lib.CurriculumTemperature(mode=CTKD_MODE), distillers_lib.create(name), False,
                            "none")
    except ValueError as e:
        raise ValueError(f"distillers: {text!r}: {e}") from None


def parse_distillers(entries) -> List[Method]:
    """The sweep's distillers as ``Method`` s, in the given order: each entry a distiller name or alias of
    ``kdjax.distillers``, optionally with ``+kd`` (or ``_kd``) for the "+KD" variant of a distiller beside KD (not
    kd itself, nor a logit distiller, which replaces KD's terms), then optionally ``+ctkd`` (or ``_ctkd``) for
    CTKD's learned temperature (kd, dkd, or a feature distiller's KD term). A mistake (unknown name, ``kd+kd``,
    ``dkd+kd``, ``dist+ctkd``, a repeat) fails in one line naming the valid ones."""
    entries = [entries] if isinstance(entries, str) else list(entries or ())
    if not entries:
        raise ValueError(f"the sweep has no distillers: set --config.distillers=kd[,crd,crd+kd...]; "
                         f"{_distiller_choices()}")
    out, seen = [], {}
    for entry in entries:
        text = str(entry).strip()
        rest, ctkd = _strip_suffix(text, WITH_CTKD)
        base, with_kd = _strip_suffix(rest, WITH_KD)
        try:
            name = distillers_lib.canonical(base)
        except ValueError:
            where = "" if base == text else f" (in {text!r})"
            raise ValueError(f"distillers: unknown distiller {base!r}{where}; {_distiller_choices()}") from None
        if with_kd and name not in _with_kd_names():
            why = ("kd is KD itself" if name == "kd" else f"{name} replaces KD's KL terms")
            raise ValueError(f"distillers: {text!r} has no '+KD' variant ({why}); {_distiller_choices()}")
        if ctkd:
            _check_ctkd(name, text)
        method = Method(name, with_kd, ctkd)
        if method.label in seen:
            raise ValueError(f"distillers: {text!r} repeats {seen[method.label]!r} (both are {method.label}); "
                             f"list each once")
        seen[method.label] = text
        out.append(method)
    return out


def given_teachers(config) -> Dict[str, str]:
    """The teachers that need no training: {model: checkpoint} of the teacher_checkpoints that are set, then those
    of ``teacher_dir`` (``<dir>/<model>/`` with a results.json) for the other models."""
    given = {name: path for name, path in config.teacher_checkpoints.items() if path}
    if config.get("teacher_dir"):
        from kdjax.checkpoint.archive_import import teacher_dirs
        given = dict(teacher_dirs(config.teacher_dir, models.names()), **given)
    return given


def run_fields(common: Dict[str, Any], **fields_) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted(dict(common, **fields_).items()))


def _inherited(config, names) -> Dict[str, Any]:
    out = {k: config[k] for k in names if k in config and config[k] is not None}
    out.update({f"dataset_options.{k}": v for k, v in config.dataset_options.items() if v is not None})
    return out


def student_workdir(base: str, method: Method, teacher: str, student: str, aug: str, seed: int) -> str:
    """``<teacher>-<student>/<aug>/seed<k>`` for kd (the layout of the sweeps before the distiller axis, so that
    they resume), ``<distiller>/<teacher>-<student>/<aug>/seed<k>`` for another (``crd_kd/`` for crd+kd)."""
    label = method.label
    top = base if label == "kd" else os.path.join(base, distiller_dir(label))
    return os.path.join(top, f"{teacher}-{student}", aug, f"seed{seed}")


def plan(config, root: str) -> List[Run]:
    """Every run of the sweep, in dependency order (see the module docstring for the layout)."""
    pairs = parse_pairs(config.pairs)
    schemes = parse_schemes(config.augs)
    methods = parse_distillers(config.get("distillers", ("kd",)))
    # the student that scores CutMixPick (S. ent.) for its T. stddev: kd's when kd is swept, else the first one's
    scorer = Method("kd") if Method("kd") in methods else methods[0]
    seeds = [int(s) for s in config.seeds]
    given = given_teachers(config)
    datasets = list(config.datasets)
    teachers = list(dict.fromkeys(t for t, _ in pairs))
    common = _inherited(config, COMMON_FIELDS)
    # one compilation cache for the whole grid: the seeds of a pair and scheme compile the same programs
    common.setdefault("compile_cache_dir", os.path.join(root, "compile_cache"))
    train_common = dict(common, **_inherited(config, TRAIN_FIELDS))
    by_student = [s for s in schemes if augment.scorer_of(s) == "student"]
    teacher_only = [s for s in schemes if s not in by_student]
    all_at_once = set(teacher_only) == {s for s in augment.PAPER_SCHEMES if augment.scorer_of(s) != "student"}
    # three or more schemes that one KD program can serve: every student runs it (the first compiles it, the others
    # read it from the compile cache; augment.switch). With two, the switch's compile (all seven branches) costs
    # about what the two programs of their own do.
    switch = {"scheme_switch": True} if len(set(schemes) & set(augment_switch.SWITCHABLE)) >= 3 else {}
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
        for teacher in teachers:
            for seed in seeds:
                workdir = os.path.join(base, "tstddev", teacher, f"seed{seed}")
                tstd = dict(common, teacher=teacher, dataset=dataset, seed=seed,
                            teacher_checkpoint=teacher_ckpt[teacher], epochs=config.tstddev_epochs)
                if all_at_once:  # one program for the eight teacher-only schemes, one base batch stream
                    # the student-scored scheme is the sweep's own later stage: no note about skipping it
                    runs.append(Run("tstddev", workdir, run_fields(tstd, aug=ALL, note_skipped=False), stage=1,
                                    done_marker="tstddev.md"))
                    continue
                for aug in teacher_only:
                    runs.append(Run("tstddev", os.path.join(workdir, aug), run_fields(tstd, aug=aug), stage=1))
        for method in methods:
            method_fields = method.fields()
            for teacher, student in pairs:
                for aug in schemes:
                    for seed in seeds:
                        runs.append(Run("distill", student_workdir(base, method, teacher, student, aug, seed),
                                        run_fields(train_common, teacher=teacher, student=student, dataset=dataset,
                                                   aug=aug, seed=seed, epochs=config.epochs,
                                                   teacher_checkpoint=teacher_ckpt[teacher], **method_fields,
                                                   **switch),
                                        stage=2))
        for aug in by_student:
            for teacher, student in pairs:
                for seed in seeds:
                    scored_by = student_workdir(base, scorer, teacher, student, aug, seed)
                    runs.append(Run("tstddev", os.path.join(base, "tstddev", os.path.relpath(scored_by, base)),
                                    run_fields(common, teacher=teacher, student=student, dataset=dataset, seed=seed,
                                               aug=aug, teacher_checkpoint=teacher_ckpt[teacher],
                                               student_checkpoint=scored_by,
                                               epochs=config.tstddev_epochs), stage=3))
    return runs

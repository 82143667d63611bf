"""Training throughput of the real KD step (original images per second), one step per dispatch against the
``lax.scan`` chunk, and the step cost of every distiller relative to plain KD.

    python bench/kd_step.py                  # resnet56->resnet20 and vgg13->vgg8; batch 64 float32, 512 bfloat16;
                                             # every distiller against KD on resnet56->resnet20 at batch 64 float32
    python bench/kd_step.py --pairs resnet56:resnet20 --settings 64:float32 --steps 1000 --distillers crd,dkd
    python bench/kd_step.py --quick          # CPU smoke run: resnet8->resnet8, 16x16, batch 16, a few steps
    python bench/kd_step.py --imagenet       # resnet34->resnet18 and resnet50->mobilenetv1 (ImageNet zoo), 224 px,
                                             # batch 256 bfloat16, chunk driver (--quick: 32 px, batch 2, CPU)
    python bench/kd_step.py --vs-original --original DIR   # CPU: kdjax's step against the original's PyTorch step,
                                             # resnet56->resnet20 batch 64 float32, interleaved windows, the ratio
    python bench/kd_step.py --conv-grad-ab   # CPU: the step with materialised weight-gradient inputs against without

What is timed is what ``kdjax.train.loop.fit`` runs: ``steps.make_kd_step`` (teacher on concat[x, x'], student on
concat[x, x'] with per-half BatchNorm, SGD update) with the scheme ``--aug`` (default ``cutmix``), each batch
gathered by index from a synthetic ``DeviceDataset`` already on the device (CIFAR-sized: 50,000 x 32x32x3, 100
classes), base crop+flip included. Two drivers of the same step, measured in the same run:

* ``single``: ``jax.jit`` of one step (state donated), one dispatch per step, no host transfer until the end of
  the timed window -- the usual JAX training loop and the baseline;
* ``chunk``: ``loop.make_chunk_fn``, ``--chunk`` steps per dispatch with one ``device_get`` of the stacked metrics
  per chunk, as ``fit`` does.

Every executable is compiled ahead of time (compile seconds are reported, never timed), warmed up once, then
``--repeats`` windows of ``--steps`` steps are timed (ending with ``block_until_ready``); the median window gives
img/s = batch x steps / seconds.

Distillers (``--distillers``, default every registered one plus ``kd+ls`` and ``dkd+ls``, KD and DKD with logit
standardisation): each one's KD step, driven as ``fit`` drives it (``parallel.steps_per_dispatch(--chunk)`` steps per
dispatch: ``--chunk`` on a GPU, 1 on XLA:CPU, one metrics transfer per dispatch), is timed against plain KD's
step of the same pair and setting (``--distiller-setting``) in the same process, *interleaved*: repetition i
times ``--distiller-steps`` steps of each, alternating one KD dispatch and one distiller dispatch (which goes
first alternates too), and ratio_i = distiller seconds / KD seconds; ``ratio_to_kd`` is the median of the
``--distiller-repeats`` ratios, with their min and max as the spread. Load on the machine then weighs on both
sides of each ratio alike. A distiller whose program is exactly plain KD's (equal lowered programs: ``ab`` and
``fsp``, whose KD stage adds nothing) is timed with the KD executable against itself, which shows the noise floor
of the ratios. The two-stage distillers (``ab``,
``ft``, ``fsp``) also get a ``<name>:init`` row, their init-stage step (``kdjax.train.init_stage``) against KD's.
A distiller whose shapes do not fit the pair (``fsp`` needs equal channels at every feature) is tried on
``--distiller-fallback-pairs`` (with a KD reference of its own), else gets a skip row with the reason.
The distillers are timed on the first ``--pairs`` pair (``--distiller-pairs``), in the order of ``DEFAULT_ORDER``
(or of ``--distillers``); ``--time-budget`` stops starting new ones when the next would not finish in time (skip
rows again), ``--compile-workers`` compiles several at once. ``--no-crd`` (the former option) = ``--distillers
none``; ``--crd-setting`` = ``--distiller-setting``.
Distillers in ``CPU_LAPACK_DISTILLERS`` (none now) are skipped on XLA:CPU with jaxlib < 0.11 (``--cpu-lapack`` to
run them).

``--imagenet`` times the ImageNet KD pairs (``IMAGENET_PAIRS``: ResNet34 -> ResNet18 and ResNet50 -> MobileNetV1 of
the ImageNet zoo) at 224 px, 1000 classes, batch 256 bfloat16 on synthetic images already on the device (2,560 of
them: one K = 10 chunk). Their step is the one the streamed ImageNet path runs (``steps.prepare_for`` of a streamed
dataset: the host pipeline did RandomResizedCrop + flip, the step only normalises) with the scheme ``--aug``; so
these rows are the device side of the ImageNet step, without the host input pipeline (``bench/input_pipeline.py``).
Only the chunk driver is timed (a step this large leaves little dispatch overhead for K to amortise), no distiller
comparison unless ``--distillers`` names some. ``--imagenet --quick``: the same pairs at 32 px, 10 classes, batch 2,
a CPU smoke run.

``--vs-original`` (CPU) times kdjax's step, driven as ``fit`` drives it on XLA:CPU (one step per dispatch, one
metrics transfer each), against the original repository's own step (``bench/original_step.py``: its models,
CutMix and DistillKL, SGD) run by the Python of ``--torch-python`` in a child process from the clone ``--original``,
window by window, alternating which goes first (``bench/vs_original.py``); it prints both img/s and the ratio kdjax
/ original (median of the pairs, with min and max), and the load average. Without a clone or torch it prints one
line saying so and times nothing else. Its defaults: resnet56:resnet20, 64:float32, 20-step windows x 5 pairs, no
distillers, no single/chunk rows; ``--quick``: resnet8:resnet8 at 32 px (the original's models pool 8x8), batch 16.

``--conv-grad-ab`` (CPU) times kdjax's step against itself with one policy flipped: the convolutions' weight
gradients computed from materialised inputs (``KDJAX_CPU_CONV_GRAD=1``, ``kdjax.models.convolution``, XLA:CPU's
default) or as XLA fuses them (``=0``), in interleaved windows as ``--vs-original`` does, with the ratio on / off
in img/s and in CPU seconds, and both sides' last losses (the same steps from the same state). Same defaults as
``--vs-original``; JSON ``kd_step_conv_grad_ab_<device>_<date>.json``.

The table goes to stdout and a JSON file to ``bench/results/kd_step_<device kind>_<date>[_quick].json``.
"""
import argparse
import concurrent.futures
import datetime
import hashlib
import os
import platform
import statistics
import sys
import time
import traceback

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import vs_original  # noqa: E402  (bench/ is on sys.path when run as a script)
from results_io import output_path, write_json  # noqa: E402  (bench/ is on sys.path when run as a script)
from kdjax import augment, distillers, models, parallel
from kdjax.data import DeviceDataset
from kdjax.data import epochs as epochs_lib
from kdjax.data.synthetic import load_synthetic
from kdjax.augment import transforms
from kdjax.train import kd, loop, recipe, steps

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The original PyTorch step on one H100 (data already on the GPU), KD + CutMix, and the targets set against it.
PYTORCH_H100 = {("resnet56", "resnet20", 64, "float32"): 2270.0, ("vgg13", "vgg8", 64, "float32"): 7010.0,
                ("resnet56", "resnet20", 512, "bfloat16"): 17600.0}
TARGETS = {("resnet56", "resnet20", 64, "float32"): 22700.0, ("vgg13", "vgg8", 64, "float32"): 70000.0,
           ("resnet56", "resnet20", 512, "bfloat16"): 70000.0}
CRD_TARGET_RATIO = 1.3  # CRD step cost / KD step cost at batch 64
# Distillers whose step runs batched LAPACK kernels on XLA:CPU (kdsvd: jnp.linalg.svd). jaxlib before 0.11 runs
# each batched LAPACK call as a ParallelBatchMap over the intra-op pool it is already running on and blocks
# waiting for it; when as many such calls run at once as the pool has threads (2 on a 2-core machine: the
# student's and the teacher's SVDs) the process hangs for good. Seen here with jax 0.10.2 (both tf_XLAEigen
# threads in lapack_sgesdd_ffi -> ParallelBatchMap -> BlockingCounter::Wait). Skipped on XLA:CPU with such a
# jaxlib unless --cpu-lapack; GPUs run cuSOLVER and are not affected. KD-SVD's SVD now runs NumPy's LAPACK through a
# host callback on CPU (kdjax/distillers/svd.py), outside XLA's pool, so nothing is skipped any more.
CPU_LAPACK_DISTILLERS = ()
LS = "+ls"  # suffix of a distiller spec: the same distiller with logit standardisation (loss.logit_stand)
# --imagenet: the standard ImageNet KD pairs (CRD, DKD, DIST, logit standardisation) and their defaults
IMAGENET_PAIRS = "resnet34_imagenet:resnet18_imagenet,resnet50_imagenet:mobilenetv1_imagenet"
IMAGENET_DEFAULTS = dict(settings="256:bfloat16", chunk=10, steps=10, repeats=3, num_train=2560, image_size=224,
                         num_classes=1000)
IMAGENET_QUICK = dict(settings="2:float32", chunk=1, steps=1, repeats=1, num_train=8, image_size=32, num_classes=10)
# The default order of --distillers (the priority under --time-budget): CRD first (it has a target), the original
# repository's order of the others, logit standardisation, then the two-stage methods (init-stage rows too).
# Registered names missing here (a distiller added later) come last; names not registered are left out.
# --vs-original: the paper's main CIFAR pair at batch 64 float32 (the original's setting); --quick: a tiny pair at
# 32 px (the original's CIFAR models pool an 8x8 map), a CPU smoke run of the mechanism
VS_ORIGINAL_DEFAULTS = dict(pairs="resnet56:resnet20", settings="64:float32", chunk=1, steps=20, repeats=5,
                            image_size=32)
VS_ORIGINAL_QUICK = dict(pairs="resnet8:resnet8", settings="16:float32", chunk=1, steps=4, repeats=3,
                         image_size=32)
DEFAULT_ORDER = ("crd", "hint", "at", "sp", "pkt", "rkd", "vid", "nst", "kdsvd", "cc", "dkd", "dist", "kd+ls",
                 "dkd+ls", "ft", "ab", "fsp")


def parse_pairs(text, option="--pairs"):
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.count(":") != 1:
            raise SystemExit(f"{option} item {item!r} must be teacher:student, e.g. resnet56:resnet20")
        teacher, student = item.split(":")
        models.check_name(teacher)
        models.check_name(student)
        pairs.append((teacher, student))
    return pairs


def parse_settings(text, option="--settings"):
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        batch, _, dtype = item.partition(":")
        if dtype not in DTYPES or not batch.isdigit() or int(batch) < 2:
            raise SystemExit(f"{option} item {item!r} must be batch:dtype with batch >= 2 and dtype in "
                             f"{', '.join(DTYPES)}, e.g. 64:float32")
        settings.append((int(batch), dtype))
    return settings


def default_distillers():
    registered = distillers.names()
    known = [s for s in DEFAULT_ORDER if s.removesuffix(LS) in registered]
    return known + [n for n in registered if n != "kd" and n not in known]


def parse_distillers(text):
    """Distiller specs NAME or NAME+ls (``all``: the default list; ``none``: no distiller comparison)."""
    text = text.strip()
    if text in ("", "none"):
        return []
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "all":
            specs += default_distillers()
            continue
        name, ls = (item[:-len(LS)], True) if item.endswith(LS) else (item, False)
        try:
            name = distillers.canonical(name)
        except ValueError as e:
            raise SystemExit(f"--distillers item {item!r}: {e}; add {LS} for logit standardisation "
                             f"({', '.join(distillers.LOGIT_STAND_DISTILLERS)})")
        if ls and name not in distillers.LOGIT_STAND_DISTILLERS:
            raise SystemExit(f"--distillers item {item!r}: logit standardisation ({LS}) applies to "
                             f"{' and '.join(distillers.LOGIT_STAND_DISTILLERS)} only")
        specs.append(name + (LS if ls else ""))
    return list(dict.fromkeys(specs))  # each once, first position kept


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=None, help="teacher:student,... (default resnet56:resnet20,vgg13:vgg8; "
                                                 "quick resnet8:resnet8)")
    p.add_argument("--settings", default=None, help="batch:dtype,... (default 64:float32,512:bfloat16; quick "
                                                    "16:float32)")
    p.add_argument("--aug", default="cutmix", help="augmentation scheme of the step (default cutmix)")
    p.add_argument("--chunk", type=int, default=None, help="steps per dispatch of the chunk path (default 100; "
                                                          "quick 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default 500; quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows, median reported (default 3; quick 2)")
    p.add_argument("--num-train", type=int, default=None, help="synthetic training set size (default 50000; "
                                                              "quick 512)")
    p.add_argument("--image-size", type=int, default=None, help="default 32; quick 16")
    p.add_argument("--num-classes", type=int, default=None, help="default 100")
    p.add_argument("--imagenet", action="store_true",
                   help=f"the ImageNet KD pairs ({IMAGENET_PAIRS}) at 224 px, batch 256 bfloat16, chunk driver "
                        "only")
    p.add_argument("--no-kd-drivers", dest="kd_drivers", action="store_false",
                   help="skip the single/chunk KD throughput rows (only the distiller comparison)")
    p.add_argument("--distillers", default="all",
                   help="NAME[+ls],... timed against plain KD (default all: every registered distiller, kd+ls and "
                        "dkd+ls; 'none' skips the comparison; 'kd' times KD against itself, the noise floor)")
    p.add_argument("--no-crd", dest="no_crd", action="store_true",
                   help="the former option: the same as --distillers none")
    p.add_argument("--distiller-setting", "--crd-setting", dest="distiller_setting", default=None,
                   help="batch:dtype of the distiller comparison (default 64:float32; quick the first setting)")
    p.add_argument("--distiller-pairs", default=None,
                   help="teacher:student,... the distillers are timed on (default the first of --pairs; 'all': "
                        "every --pairs pair)")
    p.add_argument("--distiller-fallback-pairs", default=None,
                   help="teacher:student,... tried in order for a distiller whose shapes do not fit its pair "
                        "(default resnet32x4:resnet8x4, equal widths; quick none; 'none' for none)")
    p.add_argument("--distiller-steps", type=int, default=None,
                   help="steps of each program per paired repetition (default 200; quick 8), run interleaved one dispatch "
                        "at a time; a multiple of the steps per dispatch")
    p.add_argument("--distiller-repeats", type=int, default=None,
                   help="paired KD/distiller repetitions, median ratio reported (default 5; quick 5)")
    p.add_argument("--no-init-stage", dest="init_stage", action="store_false",
                   help="skip the init-stage rows of the two-stage distillers (ab:init, ft:init, fsp:init)")
    p.add_argument("--cpu-lapack", action="store_true",
                   help=f"time {', '.join(CPU_LAPACK_DISTILLERS)} on XLA:CPU with jaxlib < 0.11 too (skipped "
                        "by default: its batched SVD can deadlock XLA:CPU's thread pool there)")
    p.add_argument("--compile-workers", type=int, default=1,
                   help="distiller programs compiled concurrently in threads (default 1; XLA compiles outside "
                        "the GIL: meant for a GPU host's many cores, where the comparison is compile-bound; no "
                        "gain on a loaded 2-core CPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds from the start: no new batch of distillers is started when the slowest batch "
                        "so far would not end before it (skip rows for the rest). Default: no limit")
    p.add_argument("--quick", action="store_true", help="tiny models and data, a few steps: a CPU smoke run")
    p.add_argument("--vs-original", action="store_true",
                   help="CPU: kdjax's step against the original's PyTorch step, interleaved windows, the ratio "
                        "(needs --original and a Python with torch; else one line saying so)")
    p.add_argument("--original", default=None, help=f"a clone of {vs_original.ORIGINAL_REPO} (for --vs-original)")
    p.add_argument("--torch-python", default=vs_original.default_torch_python(),
                   help=f"the Python with torch that runs the original's step "
                        f"(default: ${vs_original.TORCH_PYTHON_ENV})")
    p.add_argument("--original-threads", type=int, default=None,
                   help="torch.set_num_threads of the original's step (default torch's own: the cores)")
    p.add_argument("--conv-grad-ab", action="store_true",
                   help="kdjax's step with the materialised weight-gradient inputs (parallel."
                        "materialize_weight_gradient_inputs) forced off against on, interleaved windows, the ratio")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kd_step_<device>_<date>.json)")
    args = p.parse_args(argv)
    if args.imagenet:
        imagenet_defaults(args)
    if args.vs_original or args.conv_grad_ab:
        vs_original_defaults(args)
    args.num_classes = args.num_classes or 100
    q = args.quick
    args.pair_list = parse_pairs(args.pairs or ("resnet8:resnet8" if q else "resnet56:resnet20,vgg13:vgg8"))
    args.setting_list = parse_settings(args.settings or ("16:float32" if q else "64:float32,512:bfloat16"))
    args.chunk = args.chunk or (4 if q else 100)
    args.steps = args.steps or (8 if q else 500)
    args.repeats = args.repeats or (2 if q else 3)
    args.num_train = args.num_train or (512 if q else 50000)
    args.image_size = args.image_size or (16 if q else 32)
    args.dist_batch, args.dist_dtype = parse_settings(args.distiller_setting, "--distiller-setting")[0] \
        if args.distiller_setting else (args.setting_list[0] if q else (64, "float32"))
    args.distiller_list = [] if args.no_crd else parse_distillers(args.distillers)
    if args.distiller_pairs in (None, ""):
        args.dist_pairs = args.pair_list[:1]
    elif args.distiller_pairs == "all":
        args.dist_pairs = list(args.pair_list)
    else:
        args.dist_pairs = parse_pairs(args.distiller_pairs, "--distiller-pairs")
    fallback = args.distiller_fallback_pairs
    fallback = ("none" if q else "resnet32x4:resnet8x4") if fallback is None else fallback
    args.fallback_pairs = [] if fallback in ("", "none") else parse_pairs(fallback, "--distiller-fallback-pairs")
    # the distillers' steps per dispatch: what fit runs (parallel.steps_per_dispatch: --chunk, 1 on XLA:CPU)
    args.dist_chunk = parallel.steps_per_dispatch(args.chunk)
    args.dist_steps = args.distiller_steps or (8 if q else 200)
    args.dist_repeats = args.distiller_repeats or 5
    augment.check_name(args.aug)
    if args.steps % args.chunk:
        p.error(f"--steps ({args.steps}) must be a multiple of --chunk ({args.chunk})")
    if args.distiller_list and args.dist_steps % args.dist_chunk:
        p.error(f"--distiller-steps ({args.dist_steps}) must be a multiple of the steps per dispatch "
                f"({args.dist_chunk})")
    if args.compile_workers < 1:
        p.error("--compile-workers must be >= 1")
    largest = max(b for b, _ in args.setting_list)
    need = largest * args.chunk
    if args.distiller_list:
        need = max(need, args.dist_batch * args.dist_chunk)
    if args.num_train < need:
        p.error(f"--num-train ({args.num_train}) must hold one chunk of the largest batch ({need} rows)")
    return args


def imagenet_defaults(args):
    """--imagenet: the unset options take IMAGENET_DEFAULTS (IMAGENET_QUICK with --quick); no distillers unless
    --distillers names some."""
    args.pairs = args.pairs or IMAGENET_PAIRS
    for field, value in (IMAGENET_QUICK if args.quick else IMAGENET_DEFAULTS).items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.distillers == "all":
        args.distillers = "none"


def vs_original_defaults(args):
    """--vs-original: the unset options take VS_ORIGINAL_DEFAULTS (VS_ORIGINAL_QUICK with --quick); no distillers
    unless --distillers names some; the single/chunk rows are left out (the comparison times the step as fit
    drives it)."""
    for field, value in (VS_ORIGINAL_QUICK if args.quick else VS_ORIGINAL_DEFAULTS).items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    if args.distillers == "all":
        args.distillers = "none"
    args.kd_drivers = False


def case_prepare(dataset, teacher_name, student_name):
    """The step's ``prepare``: for the ImageNet zoo what a streamed dataset gets (normalisation only: its host
    pipeline crops and flips), for the CIFAR-sized zoo the original's pad-crop + flip + normalise."""
    if teacher_name.endswith("_imagenet") or student_name.endswith("_imagenet"):
        return lambda key, images: transforms.normalize(images, dataset.mean, dataset.std)
    return steps.make_prepare(dataset.mean, dataset.std, transforms.default_pad(dataset.image_size))


_INIT_STATES = {}


def initial_model_state(name, model, tx, key_index, size, classes, dtype, batch):
    """``recipe.init_state`` of a model (key ``fold_in(key(0), key_index)``), computed once per process for each
    (model, key, size, classes, dtype, batch): every case of a pair starts from the same variables, and the init
    program is recompiled for each new model object (some seconds per model on XLA:CPU). Cases never donate
    their initial state (the drivers run on copies), so sharing it is safe."""
    key = (name, key_index, size, classes, dtype, batch)
    if key not in _INIT_STATES:
        _INIT_STATES[key] = recipe.init_state(model, tx, jax.random.fold_in(jax.random.key(0), key_index), size)
    return dict(_INIT_STATES[key])


def lowered_digest(lowered):
    """A digest of a lowered program's text: two distillers with equal digests run the same executable."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


class Case:
    """One (pair, batch, dtype, distiller spec, stage): the step, its initial state, the teacher's variables and
    the compiled chunk programs (one per steps-per-dispatch K, compiled ahead of time on demand).

    ``spec``: a distiller name, or ``NAME+ls`` (logit standardisation). ``stage``: ``kd`` (the KD step) or
    ``init`` (a two-stage distiller's init-stage step, ``kdjax.train.init_stage``)."""

    def __init__(self, teacher_name, student_name, batch, dtype, spec, dataset, data, mesh, aug, stage="kd"):
        self.batch, self.spec, self.stage = batch, spec, stage
        size, classes = dataset.image_size, dataset.num_classes
        name, ls = (spec[:-len(LS)], True) if spec.endswith(LS) else (spec, False)
        student = models.create(student_name, classes, size, DTYPES[dtype])
        teacher = models.create(teacher_name, classes, size, DTYPES[dtype])
        self.steps_per_epoch = dataset.num_train // batch
        tx, _ = recipe.make_optimizer(0.05, self.steps_per_epoch, (150, 180, 210))
        distiller = distillers.create(name)
        self.distiller = distiller
        prepare = case_prepare(dataset, teacher_name, student_name)
        key = jax.random.key(0)
        state = initial_model_state(student_name, student, tx, 0, size, classes, dtype, batch)
        teacher_vars = {k: v for k, v in
                        initial_model_state(teacher_name, teacher, tx, 1, size, classes, dtype, batch).items()
                        if k in ("params", "batch_stats")}
        student_vars = {"params": state["params"], "batch_stats": state["batch_stats"]}
        plan = epochs_lib.make_plan(dataset.num_train, batch, last_batch="drop")  # num_train // batch steps
        kd_recipe = recipe.Recipe(1, plan, 1, 0.05, (), 0.1, tx, None)
        w = distillers.resolve_weights(distiller, aug, logit_stand=ls)
        method = kd.KDMethod(distiller, steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"],
                                                        logit_stand=ls))
        setup = kd.KDSetup(method=method, scheme=augment.create(aug, dataset_stats=dataset, n_pick=batch),
                           prepare=prepare, student=student, teacher=teacher, student_name=student_name,
                           num_classes=classes, image_size=size, batch=batch)
        if stage == "init":
            from kdjax.train import init_stage  # noqa: PLC0415  (absent before the two-stage methods landed)
            feats_s, feats_t = setup.feature_shapes(student_vars, teacher_vars)
            heads = distiller.init_stage_heads(jax.random.fold_in(key, 2), feats_s, feats_t)
            stage_recipe = init_stage.make_init_recipe(kd_recipe, distiller, student_name,
                                                       state["params"], heads)
            self.step_fn = init_stage.make_init_step(student, student_name, teacher, stage_recipe.tx, prepare,
                                                     distiller)
            state = init_stage.init_stage_state(stage_recipe.tx, state, heads)
        else:
            self.step_fn = setup.make_step(kd_recipe)
            state["extra"] = setup.init_extra(tx, jax.random.fold_in(key, 2), student_vars, teacher_vars,
                                              dataset.num_train, dataset.train_labels)
        replicated = NamedSharding(mesh, P())
        self.initial_state = jax.device_put(state, replicated)
        self.teacher_vars = jax.device_put(teacher_vars, replicated)
        self.data, self.mesh = data, mesh
        self.perm = jax.device_put(jax.random.permutation(jax.random.key(3), dataset.num_train), replicated)
        self.step_key = jax.random.key(4)
        self.programs, self.lowered, self.compile_s = {}, {}, {}
        self.state, self.step = None, 0  # the paired windows' running state

    def fresh_state(self):
        return jax.tree.map(jnp.copy, self.initial_state)  # the drivers donate their state

    def _args(self, state):
        return (state, self.teacher_vars, self.data, self.perm, 0, 0, self.step_key, {})

    def lower(self, chunk):
        """Trace and lower the K=chunk program (Python, under the GIL); returns the program's digest."""
        if chunk not in self.lowered:
            self.lowered[chunk] = loop.make_chunk_fn(self.step_fn, chunk, self.batch).lower(
                *self._args(self.initial_state))
        return lowered_digest(self.lowered[chunk])

    def compile(self, chunk):
        """The compiled K=chunk program (compiled once; the seconds it took are kept in ``compile_s``)."""
        if chunk not in self.programs:
            self.lower(chunk)
            t0 = time.perf_counter()
            self.programs[chunk] = self.lowered[chunk].compile()
            self.compile_s[chunk] = time.perf_counter() - t0
        return self.programs[chunk]

    def adopt(self, other, chunk):
        """Run ``other``'s compiled K=chunk program (the same program: equal lowered digests)."""
        self.programs[chunk] = other.compile(chunk)
        self.compile_s[chunk] = 0.0

    def time_single(self, steps_per_window, repeats):
        compiled = self.compile(1)  # one step per dispatch, no loop
        compile_s = self.compile_s[1]
        state = self.fresh_state()
        state, _ = compiled(*self._args(state))  # warm-up
        jax.block_until_ready(state)
        windows, step = [], 1
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps_per_window):
                first = (step % self.steps_per_epoch) * self.batch
                state, metrics = compiled(state, self.teacher_vars, self.data, self.perm, first, step, self.step_key, {})
                step += 1
            jax.block_until_ready((state, metrics))
            windows.append(time.perf_counter() - t0)
        return compile_s, windows, float(jax.device_get(metrics["loss"])[-1])

    def run_chunks(self, compiled, state, step, chunk, n_chunks):
        """``n_chunks`` dispatches of the K=chunk program from ``step``, one metrics transfer each (as loop.fit)."""
        starts = self.steps_per_epoch - chunk + 1  # chunk starts that stay inside one epoch's permutation
        metrics = None
        for _ in range(n_chunks):
            first = (step % starts) * self.batch
            state, metrics = compiled(state, self.teacher_vars, self.data, self.perm, first, step, self.step_key, {})
            metrics = jax.device_get(metrics)  # the one transfer per chunk, as in loop.fit
            step += chunk
        jax.block_until_ready(state)
        return state, step, metrics

    def time_chunk(self, chunk, steps_per_window, repeats):
        compiled = self.compile(chunk)
        compile_s = self.compile_s[chunk]
        state = self.fresh_state()
        state, metrics = compiled(*self._args(state))  # warm-up
        jax.device_get(metrics)
        windows, step = [], chunk
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, step, metrics = self.run_chunks(compiled, state, step, chunk, steps_per_window // chunk)
            windows.append(time.perf_counter() - t0)
        return compile_s, windows, float(np.asarray(metrics["loss"])[-1])

    def dispatch(self, chunk):
        """One timed dispatch of the K=chunk program (to its metrics transfer), continuing this case's own
        running state: the unit of the paired comparison."""
        compiled = self.compile(chunk)
        if self.state is None:
            self.state, self.step = self.fresh_state(), 0
            self.state, self.step, _ = self.run_chunks(compiled, self.state, self.step, chunk, 1)  # warm-up
        t0 = time.perf_counter()
        self.state, self.step, metrics = self.run_chunks(compiled, self.state, self.step, chunk, 1)
        seconds = time.perf_counter() - t0
        self.last_loss = float(np.asarray(metrics["loss"])[-1])
        return seconds

    def release(self):
        self.state = None
        self.programs.clear()
        self.lowered.clear()


def row(pair, batch, dtype, distiller, driver, chunk, steps_per_window, compile_s, windows, loss):
    median = statistics.median(windows)
    return {"teacher": pair[0], "student": pair[1], "batch": batch, "dtype": dtype, "distiller": distiller,
            "driver": driver, "steps_per_dispatch": chunk, "compile_s": round(compile_s, 3),
            "window_s": [round(w, 6) for w in windows], "ms_per_step": 1e3 * median / steps_per_window,
            "img_per_s": batch * steps_per_window / median, "last_loss": loss}


# ------------------------------------------------------------------------------------------- distillers vs KD


def spec_parts(spec):
    return (spec[:-len(LS)], True) if spec.endswith(LS) else (spec, False)


class ShapeCheck:
    """Whether a distiller's shapes fit a pair (``check_shapes`` on abstract features, cached per model)."""

    def __init__(self, num_classes, image_size, batch):
        self.num_classes, self.image_size, self.batch, self.cache = num_classes, image_size, batch, {}

    def feats(self, model, preact):
        key = (model, preact)
        if key not in self.cache:
            self.cache[key] = models.abstract_feature_shapes(model, self.num_classes, self.image_size, self.batch, preact)
        return self.cache[key]

    def reason(self, spec, pair):
        """None when ``spec`` fits ``pair``, else the distiller's own message."""
        d = distillers.create(spec_parts(spec)[0])
        if not (distillers.has_feature_term(d) or d.init_stage):
            return None
        try:
            d.check_shapes(self.feats(pair[1], bool(d.preact)), self.feats(pair[0], bool(d.preact)))
        except ValueError as e:
            return str(e)
        return None


def init_stage_available():
    """'' when ``kdjax.train.init_stage`` has what the init-stage rows need, else why not."""
    try:
        from kdjax.train import init_stage  # noqa: PLC0415
    except ImportError as e:
        return f"kdjax.train.init_stage is not importable ({e})"
    missing = [f for f in ("make_init_recipe", "init_stage_state", "make_init_step") if not hasattr(init_stage, f)]
    return f"kdjax.train.init_stage lacks {', '.join(missing)}" if missing else ""


def cpu_lapack_hazard(spec, args):
    """The reason to skip ``spec`` on this backend (module comment of CPU_LAPACK_DISTILLERS), or ''."""
    if args.cpu_lapack or spec_parts(spec)[0] not in CPU_LAPACK_DISTILLERS or jax.default_backend() != "cpu":
        return ""
    version = tuple(int(v) for v in jax.lib.__version__.split(".")[:2] if v.isdigit())
    if version >= (0, 11):
        return ""
    return (f"not run on XLA:CPU with jaxlib {jax.lib.__version__}: its batched SVD (LAPACK ParallelBatchMap on "
            "the intra-op pool) can deadlock the process (hung here on 2 cores); --cpu-lapack to try")


def distiller_row(spec, stage, pair, batch, dtype, chunk, steps_per_window, status="ok", reason="", **fields):
    r = {"distiller": spec if stage == "kd" else f"{spec}:init", "spec": spec, "stage": stage,
         "teacher": pair[0] if pair else None, "student": pair[1] if pair else None, "batch": batch,
         "dtype": dtype, "steps_per_dispatch": chunk, "steps_per_window": steps_per_window, "status": status,
         "reason": reason}
    r.update(fields)
    return r


def paired(ref, case, chunk, steps_per_window, repeats):
    """Interleaved KD / distiller timing: (ratios, distiller seconds, KD seconds), one entry per repetition.

    Repetition i runs ``steps_per_window // chunk`` dispatches of each program, alternating one KD dispatch and
    one distiller dispatch (which goes first alternates too), each timed to its metrics transfer; its window
    seconds are the sums, and ratio_i = distiller seconds / KD seconds. Each distiller dispatch has a KD dispatch
    right beside it, so load that comes and goes weighs on both sides of the ratio alike."""
    ratios, d_s, kd_s = [], [], []
    for i in range(repeats):
        k = d = 0.0
        for j in range(steps_per_window // chunk):
            if (i + j) % 2 == 0:
                k += ref.dispatch(chunk)
                d += case.dispatch(chunk)
            else:
                d += case.dispatch(chunk)
                k += ref.dispatch(chunk)
        ratios.append(d / k)
        d_s.append(d)
        kd_s.append(k)
    return ratios, d_s, kd_s


DIST_HEADER = (f"{'distiller':<12} {'pair':<22} {'batch':>5} {'dtype':<9} {'K':>4} {'compile s':>9} "
               f"{'ms/step':>9} {'KD ms/step':>10} {'ratio':>7}  {'[min, max]':<15} note")


def print_distiller_row(r):
    pair = f"{r['teacher']}->{r['student']}" if r.get("teacher") else "-"
    head = f"{r['distiller']:<12} {pair:<22} {r['batch']:>5} {r['dtype']:<9} {r['steps_per_dispatch']:>4} "
    if r["status"] != "ok":
        print(f"{head}{'-':>9} {'-':>9} {'-':>10} {'-':>7}  {'-':<15} {r['status']}: {r['reason']}", flush=True)
        return
    spread = f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]"
    print(f"{head}{r['compile_s']:>9.1f} {r['step_ms']:>9.3f} {r['kd_step_ms']:>10.3f} {r['ratio_to_kd']:>7.3f}  "
          f"{spread:<15} {r.get('note', '')}".rstrip(), flush=True)


def compare_distillers(args, dataset, data, mesh, kd_cases, t_start):
    """One row per distiller (and init stage) at the distiller setting: its step against KD's, paired."""
    batch, dtype, chunk = args.dist_batch, args.dist_dtype, args.dist_chunk
    n_steps, repeats = args.dist_steps, args.dist_repeats
    checker = ShapeCheck(args.num_classes, args.image_size, batch)
    init_missing = init_stage_available() if args.init_stage else "--no-init-stage"
    rows, refs = [], {}
    print()
    print(f"distillers vs plain KD: batch {batch} {dtype}, K = {chunk} steps per dispatch, {n_steps}-step windows, "
          f"{repeats} paired repetitions (KD and distiller dispatches alternating), compile workers "
          f"{args.compile_workers}")
    print(DIST_HEADER)
    print("-" * len(DIST_HEADER))

    def emit(r):
        rows.append(r)
        print_distiller_row(r)

    # the jobs, in priority order: spec, stage, pair, skip (the reason it is not timed) and note
    jobs = []
    for pair in args.dist_pairs:
        for spec in args.distiller_list:
            stages = ["kd", "init"] if distillers.create(spec_parts(spec)[0]).init_stage else ["kd"]
            for stage in stages:
                job = {"spec": spec, "stage": stage, "pair": pair, "skip": None, "note": ""}
                jobs.append(job)
                if stage == "init" and init_missing:
                    job["skip"] = f"init stage not timed: {init_missing}"
                    continue
                if cpu_lapack_hazard(spec, args):
                    job["skip"] = cpu_lapack_hazard(spec, args)
                    continue
                why = checker.reason(spec, pair)
                if why is None:
                    continue
                fits = [fb for fb in args.fallback_pairs if checker.reason(spec, fb) is None]
                if fits:
                    job["pair"], job["note"] = fits[0], f"on a fallback pair ({pair[0]}->{pair[1]}: {why})"
                else:
                    tried = ", ".join(f"{t}->{s}" for t, s in [pair] + args.fallback_pairs)
                    job["skip"] = f"shapes do not fit ({tried}): {why}"

    def reference(pair):
        """The plain KD case of ``pair`` at the distiller setting (the KD rows' case when it is the same)."""
        if pair not in refs:
            ref = kd_cases.get((*pair, batch, dtype))
            if ref is None:
                ref = Case(*pair, batch, dtype, "kd", dataset, data, mesh, args.aug)
            ref.compile(chunk)
            refs[pair] = ref
        return refs[pair]

    def skipped(job, reason):
        emit(distiller_row(job["spec"], job["stage"], job["pair"], batch, dtype, chunk, n_steps, "skipped", reason))

    def failed(job, what, e):
        traceback.print_exc()
        emit(distiller_row(job["spec"], job["stage"], job["pair"], batch, dtype, chunk, n_steps, "error",
                           f"{what} failed: {type(e).__name__}: {str(e)[:300]}"))

    slowest = 0.0  # wall seconds of the slowest batch of distillers so far (build + compile + timing)
    for job in [j for j in jobs if j["skip"]]:
        skipped(job, job["skip"])
    runnable = [j for j in jobs if not j["skip"]]
    while runnable:
        elapsed = time.perf_counter() - t_start
        if args.time_budget is not None and elapsed + slowest > args.time_budget:
            for job in runnable:
                skipped(job, f"--time-budget {args.time_budget:g} s: {elapsed:.0f} s used, the slowest batch of "
                             f"distillers so far took {slowest:.0f} s")
            break
        # one batch of up to --compile-workers jobs: built (traced, lowered) here, compiled concurrently, then timed
        todo, runnable = runnable[:args.compile_workers], runnable[args.compile_workers:]
        for pair in dict.fromkeys(job["pair"] for job in todo):  # KD references first: not a distiller's time
            try:
                reference(pair)
            except Exception:  # noqa: BLE001  (reported with each of its distillers below)
                traceback.print_exc()
        t_batch = time.perf_counter()
        built = []
        for job in todo:
            t0 = time.perf_counter()
            try:
                ref = reference(job["pair"])
                case = Case(*job["pair"], batch, dtype, job["spec"] if job["stage"] == "kd" else
                            spec_parts(job["spec"])[0], dataset, data, mesh, args.aug, stage=job["stage"])
                job["same"] = case.lower(chunk) == ref.lower(chunk)
                if job["same"]:
                    case.adopt(ref, chunk)
                job.update(ref=ref, case=case, build_s=time.perf_counter() - t0)
                built.append(job)
            except Exception as e:  # a distiller that cannot be built must not stop the others
                failed(job, "building the step", e)
        to_compile = [j for j in built if not j["same"]]
        if len(to_compile) > 1:
            with concurrent.futures.ThreadPoolExecutor(len(to_compile)) as pool:
                for job, f in [(j, pool.submit(j["case"].compile, chunk)) for j in to_compile]:
                    job["error"] = f.exception()
        else:
            for job in to_compile:
                try:
                    job["case"].compile(chunk)
                except Exception as e:
                    job["error"] = e
        for job in built:
            case, ref, spec, stage = job["case"], job["ref"], job["spec"], job["stage"]
            try:
                if job.get("error") is not None:
                    raise job["error"]
                ratios, d_s, kd_s = paired(ref, case, chunk, n_steps, repeats)
                notes = [n for n in ("the same program as kd: timed against itself, the noise floor" if job["same"]
                                     else "", "init-stage step: base batch only, no x'" if stage == "init" else "",
                                     job["note"]) if n]
                emit(distiller_row(
                    spec, stage, job["pair"], batch, dtype, chunk, n_steps, logit_stand=spec.endswith(LS),
                    same_program_as_kd=job["same"], step_ms=1e3 * statistics.median(d_s) / n_steps,
                    kd_step_ms=1e3 * statistics.median(kd_s) / n_steps, ratio_to_kd=statistics.median(ratios),
                    ratio_min=min(ratios), ratio_max=max(ratios), ratios=[round(x, 4) for x in ratios],
                    window_s=[round(x, 6) for x in d_s], kd_window_s=[round(x, 6) for x in kd_s],
                    compile_s=round(case.compile_s[chunk], 3), kd_compile_s=round(ref.compile_s[chunk], 3),
                    build_s=round(job["build_s"], 3), img_per_s=batch * n_steps / statistics.median(d_s),
                    kd_img_per_s=batch * n_steps / statistics.median(kd_s), last_loss=case.last_loss,
                    note="; ".join(notes)))
            except Exception as e:
                failed(job, "compiling or running the step", e)
            finally:
                case.release()
                job.pop("case"), job.pop("ref")
        slowest = max(slowest, time.perf_counter() - t_batch)
    return rows


def time_imagenet_pairs(args, dataset, data, mesh, record):
    """--imagenet: the chunk driver of every pair and setting (summary entries: chunk img/s, step ms)."""
    header = (f"{'pair':<40} {'batch':>5} {'dtype':<9} {'distiller':<9} {'driver':<7} {'compile s':>9} "
              f"{'ms/step':>9} {'img/s':>10}")
    print(header)
    print("-" * len(header))
    summary = []
    for pair in args.pair_list:
        for batch, dtype in args.setting_list:
            case = Case(*pair, batch, dtype, "kd", dataset, data, mesh, args.aug)
            chunk = record(row(pair, batch, dtype, "kd", "chunk", args.chunk, args.steps,
                               *case.time_chunk(args.chunk, args.steps, args.repeats)))
            summary.append({"teacher": pair[0], "student": pair[1], "batch": batch, "dtype": dtype,
                            "image_size": args.image_size, "chunk_img_per_s": chunk["img_per_s"],
                            "ms_per_step": chunk["ms_per_step"]})
            case.release()
            del case
    return summary


def time_vs_original(args, dataset, data, mesh):
    """--vs-original: per pair and float32 setting, kdjax's step (as fit drives it) against the original's,
    interleaved windows (bench/vs_original.py). Returns the JSON section: status, environment and one entry each."""
    reason = vs_original.skip_reason(args.original, args.torch_python)
    if not reason and jax.default_backend() != "cpu":
        reason = (f"original step not timed: it runs on CPU and jax runs on {jax.default_backend()}; compare on "
                  "a CPU (JAX_PLATFORMS=cpu)")
    print()
    if reason:
        print(reason, flush=True)
        return {"status": "skipped", "reason": reason}
    chunk = parallel.steps_per_dispatch(args.chunk)
    section = {"status": "ok", "original": str(args.original), "torch_python": args.torch_python,
               "steps_per_window": args.steps, "pairs_of_windows": args.repeats, "steps_per_dispatch": chunk,
               "environment": vs_original.environment(),
               "ratio": "kdjax img/s / original img/s of each interleaved pair of windows; median, min, max",
               "entries": []}
    print(f"kdjax vs the original's PyTorch step ({args.original}): {args.steps}-step windows, {args.repeats} "
          f"interleaved pairs, kdjax {chunk} step(s) per dispatch", flush=True)
    for pair in args.pair_list:
        for batch, dtype in args.setting_list:
            entry = {"teacher": pair[0], "student": pair[1], "batch": batch, "dtype": dtype}
            section["entries"].append(entry)
            if dtype != "float32":
                entry.update(status="skipped", reason="the original's step runs in float32 only")
                continue
            server = vs_original.OriginalServer(vs_original.original_command(
                args.torch_python, args.original, *pair, batch, args.image_size, args.num_classes,
                args.original_threads))
            try:  # the original builds and warms up while kdjax compiles (neither is timed)
                case = Case(*pair, batch, dtype, "kd", dataset, data, mesh, args.aug)
                case.compile(chunk)
                case.dispatch(chunk)  # warm-up
                entry["original_versions"] = server.ready()

                def kdjax_window(steps):
                    cpu = time.process_time()
                    seconds = sum(case.dispatch(chunk) for _ in range(steps // chunk))
                    return seconds, time.process_time() - cpu

                pairs = vs_original.interleaved_windows(kdjax_window, server.time, args.steps, args.repeats)
                entry.update(status="ok", compile_s=round(case.compile_s[chunk], 3), last_loss=case.last_loss,
                             windows=pairs, **vs_original.ratio_summary(pairs, batch, args.steps))
                print(vs_original.summary_line(entry, *pair, batch, dtype), flush=True)
                case.release()
            except Exception as e:  # noqa: BLE001  (a failed pair must not lose the others)
                traceback.print_exc()
                entry.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            finally:
                server.close()
    return section


def time_conv_grad_ab(args, dataset, data, mesh):
    """--conv-grad-ab: per pair and float32 setting, the same KD step traced with ``KDJAX_CPU_CONV_GRAD=0`` (XLA's
    weight gradients as they are) and ``=1`` (their inputs materialised, ``kdjax.models.convolution``), driven as
    fit drives it, in interleaved windows (``vs_original.interleaved_windows``: A = on, B = off). Both run the same
    steps from the same state, so their last losses should agree. Returns the JSON section."""
    chunk = parallel.steps_per_dispatch(args.chunk)
    section = {"steps_per_window": args.steps, "pairs_of_windows": args.repeats, "steps_per_dispatch": chunk,
               "environment": vs_original.environment(),
               "ratio": "img/s with the policy on / off, each interleaved pair of windows; median, min, max",
               "entries": []}
    print(f"\nweight-gradient inputs materialised (on) against XLA's default (off): {args.steps}-step windows, "
          f"{args.repeats} interleaved pairs, {chunk} step(s) per dispatch", flush=True)
    previous = os.environ.get(parallel.CONV_GRAD_ENV)
    for pair in args.pair_list:
        for batch, dtype in args.setting_list:
            entry = {"teacher": pair[0], "student": pair[1], "batch": batch, "dtype": dtype}
            section["entries"].append(entry)
            cases = {}
            for side in ("0", "1"):  # the policy is read when the step is traced (Case.compile lowers it)
                os.environ[parallel.CONV_GRAD_ENV] = side
                cases[side] = Case(*pair, batch, dtype, "kd", dataset, data, mesh, args.aug)
                cases[side].compile(chunk)
                cases[side].dispatch(chunk)  # warm-up
            if previous is None:
                os.environ.pop(parallel.CONV_GRAD_ENV)
            else:
                os.environ[parallel.CONV_GRAD_ENV] = previous

            def window(case):
                def run(steps):
                    cpu = time.process_time()
                    seconds = sum(case.dispatch(chunk) for _ in range(steps // chunk))
                    return seconds, time.process_time() - cpu
                return run

            pairs = vs_original.interleaved_windows(window(cases["1"]), window(cases["0"]), args.steps, args.repeats)
            summary = vs_original.ratio_summary(pairs, batch, args.steps)
            entry.update(compile_s_off=round(cases["0"].compile_s[chunk], 3),
                         compile_s_on=round(cases["1"].compile_s[chunk], 3), last_loss_off=cases["0"].last_loss,
                         last_loss_on=cases["1"].last_loss, windows=pairs, on_img_per_s=summary["kdjax_img_per_s"],
                         off_img_per_s=summary["original_img_per_s"],
                         **{k: v for k, v in summary.items() if not k.endswith("img_per_s")})
            load = "" if entry["load_min"] is None else f"; load {entry['load_min']:.1f}-{entry['load_max']:.1f}"
            print(f"{pair[0]}->{pair[1]} batch {batch} {dtype}: on {entry['on_img_per_s']:,.1f} img/s, off "
                  f"{entry['off_img_per_s']:,.1f} img/s: on / off = {entry['ratio']:.3f}x [{entry['ratio_min']:.3f}, "
                  f"{entry['ratio_max']:.3f}] (CPU seconds: {entry['cpu_ratio']:.3f}x [{min(entry['cpu_ratios']):.3f}, "
                  f"{max(entry['cpu_ratios']):.3f}]){load}; last loss on {entry['last_loss_on']:.7f} off "
                  f"{entry['last_loss_off']:.7f}", flush=True)
            for case in cases.values():
                case.release()
    return section


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = jax.devices()[0]
    kind = device.device_kind
    mesh = jax.sharding.Mesh(np.array([device]), ("data",))  # one device: the per-card figure
    dataset = load_synthetic(image_size=args.image_size, num_classes=args.num_classes, num_train=args.num_train,
                             num_test=args.num_classes)
    data = DeviceDataset.create(dataset, mesh, placement="replicated")
    print(f"device: {kind}  jax {jax.__version__}  aug {args.aug}  {args.num_train} x {args.image_size}x"
          f"{args.image_size}  window {args.steps} steps x {args.repeats}  chunk {args.chunk}")
    rows, summary, kd_cases = [], [], {}

    def record(r):
        rows.append(r)
        pair_width = 40 if args.imagenet else 22
        print(f"{r['teacher'] + '->' + r['student']:<{pair_width}} {r['batch']:>5} {r['dtype']:<9} {r['distiller']:<9} "
              f"{r['driver']:<7} {r['compile_s']:>9.1f} {r['ms_per_step']:>9.3f} {r['img_per_s']:>10,.0f}",
              flush=True)
        return r

    if args.kd_drivers and args.imagenet:
        summary += time_imagenet_pairs(args, dataset, data, mesh, record)
    elif args.kd_drivers:
        header = (f"{'pair':<22} {'batch':>5} {'dtype':<9} {'distiller':<9} {'driver':<7} {'compile s':>9} "
                  f"{'ms/step':>9} {'img/s':>10}")
        print(header)
        print("-" * len(header))
        for pair in args.pair_list:
            for batch, dtype in args.setting_list:
                case = Case(*pair, batch, dtype, "kd", dataset, data, mesh, args.aug)
                single = record(row(pair, batch, dtype, "kd", "single", 1, args.steps,
                                    *case.time_single(args.steps, args.repeats)))
                chunk = record(row(pair, batch, dtype, "kd", "chunk", args.chunk, args.steps,
                                   *case.time_chunk(args.chunk, args.steps, args.repeats)))
                key = (*pair, batch, dtype)
                entry = {"teacher": pair[0], "student": pair[1], "batch": batch, "dtype": dtype,
                         "single_img_per_s": single["img_per_s"], "chunk_img_per_s": chunk["img_per_s"],
                         "chunk_speedup": chunk["img_per_s"] / single["img_per_s"]}
                if key in TARGETS:
                    entry.update(pytorch_h100_img_per_s=PYTORCH_H100[key], target_img_per_s=TARGETS[key],
                                 x_pytorch_h100=chunk["img_per_s"] / PYTORCH_H100[key])
                summary.append(entry)
                if args.distiller_list and pair in args.dist_pairs and (batch, dtype) == (args.dist_batch,
                                                                                         args.dist_dtype):
                    kd_cases[key] = case  # the KD reference of the distiller comparison: its programs are built
                else:
                    del case

    dist_rows = compare_distillers(args, dataset, data, mesh, kd_cases, t_start) if args.distiller_list else []
    vs_section = time_vs_original(args, dataset, data, mesh) if args.vs_original else None
    ab_section = time_conv_grad_ab(args, dataset, data, mesh) if args.conv_grad_ab else None
    kd_cases.clear()

    print()
    for e in summary:
        line = (f"{e['teacher']}->{e['student']} batch {e['batch']} {e['dtype']}: chunk {e['chunk_img_per_s']:,.0f} "
                f"img/s" + (f", {e['chunk_speedup']:.2f}x the one-step-per-dispatch loop" if "chunk_speedup" in e
                            else f" ({e['ms_per_step']:.1f} ms per step)"))
        if "target_img_per_s" in e:
            line += (f"; {e['x_pytorch_h100']:.1f}x the PyTorch H100 figure {e['pytorch_h100_img_per_s']:,.0f} "
                     f"(target {e['target_img_per_s']:,.0f} on an H100)")
        print(line)
    ok = [r for r in dist_rows if r["status"] == "ok"]
    if dist_rows:
        print(f"distillers: {len(ok)} timed, {len(dist_rows) - len(ok)} skipped or failed; step cost / KD "
              f"(median of {args.dist_repeats} paired windows): " +
              ", ".join(f"{r['distiller']} {r['ratio_to_kd']:.2f}x" for r in ok))
        for r in ok:
            if r["spec"] == "crd" and r["stage"] == "kd":
                print(f"CRD step cost {r['ratio_to_kd']:.2f}x KD on {r['teacher']}->{r['student']} (target <= "
                      f"{CRD_TARGET_RATIO})")

    result = {
        "benchmark": "KD training step",
        "device_kind": kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "aug": args.aug,
        "num_train": args.num_train,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "steps_per_window": args.steps,
        "repeats": args.repeats,
        "chunk": args.chunk,
        "quick": args.quick,
        "imagenet": args.imagenet,
        # the weight-gradient policy the steps were traced with (--conv-grad-ab: both, see its section)
        "materialize_weight_gradient_inputs": (None if args.conv_grad_ab else
                                               parallel.materialize_weight_gradient_inputs()),
        "img_per_s": "original images per second: batch x steps / seconds (the step also runs x')",
        "command": " ".join(["bench/kd_step.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "summary": summary,
        "results": rows,
        "distiller_comparison": {
            "batch": args.dist_batch, "dtype": args.dist_dtype, "steps_per_dispatch": args.dist_chunk,
            "steps_per_window": args.dist_steps, "repeats": args.dist_repeats,
            "pairs": [f"{t}:{s}" for t, s in args.dist_pairs],
            "fallback_pairs": [f"{t}:{s}" for t, s in args.fallback_pairs],
            "compile_workers": args.compile_workers, "time_budget_s": args.time_budget,
            "crd_target_ratio": CRD_TARGET_RATIO,
            "ratio_to_kd": "median over paired repetitions of (distiller window s / KD window s), the windows "
                           "interleaved dispatch by dispatch, order alternating; ratio_min/ratio_max: the "
                           "spread",
        },
        "distillers": dist_rows,
        **({"vs_original": vs_section} if vs_section is not None else {}),
        **({"conv_grad_ab": ab_section} if ab_section is not None else {}),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    bench_name = ("kd_step_vs_original" if args.vs_original else
                  "kd_step_conv_grad_ab" if args.conv_grad_ab else "kd_step")
    write_json(result, args.out or output_path(bench_name, kind, args.quick))
    return result


if __name__ == "__main__":
    main()

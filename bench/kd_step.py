"""Training throughput of the real KD step (original images per second), one step per dispatch against the
``lax.scan`` chunk, and the cost of CRD relative to plain KD.

    python bench/kd_step.py                  # resnet56->resnet20 and vgg13->vgg8; batch 64 float32, 512 bfloat16
    python bench/kd_step.py --pairs resnet56:resnet20 --settings 64:float32 --steps 1000
    python bench/kd_step.py --quick          # CPU smoke run: resnet8->resnet8, 16x16, batch 16, a few steps

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
img/s = batch x steps / seconds. ``--crd`` also times the chunk path with ``distiller=crd`` (16,384 negatives,
memory banks of the whole training set) at ``--crd-setting`` and reports its step cost relative to plain KD.
The table goes to stdout and a JSON file to ``bench/results/kd_step_<device kind>_<date>[_quick].json``.
"""
import argparse
import datetime
import platform
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from results_io import output_path, write_json  # noqa: E402  (bench/ is on sys.path when run as a script)
from kdjax import augment, distillers, models
from kdjax.data import DeviceDataset
from kdjax.data.synthetic import load_synthetic
from kdjax.tasks import common
from kdjax.tasks.distill import init_extra
from kdjax.augment import transforms
from kdjax.train import loop, recipe, steps

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The original PyTorch step on one H100 (data already on the GPU), KD + CutMix, and the targets set against it.
PYTORCH_H100 = {("resnet56", "resnet20", 64, "float32"): 2270.0, ("vgg13", "vgg8", 64, "float32"): 7010.0,
                ("resnet56", "resnet20", 512, "bfloat16"): 17600.0}
TARGETS = {("resnet56", "resnet20", 64, "float32"): 22700.0, ("vgg13", "vgg8", 64, "float32"): 70000.0,
           ("resnet56", "resnet20", 512, "bfloat16"): 70000.0}
CRD_TARGET_RATIO = 1.3  # CRD step cost / KD step cost at batch 64


def parse_pairs(text):
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.count(":") != 1:
            raise SystemExit(f"--pairs item {item!r} must be teacher:student, e.g. resnet56:resnet20")
        teacher, student = item.split(":")
        models.check_name(teacher)
        models.check_name(student)
        pairs.append((teacher, student))
    return pairs


def parse_settings(text):
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        batch, _, dtype = item.partition(":")
        if dtype not in DTYPES or not batch.isdigit() or int(batch) < 2:
            raise SystemExit(f"--settings item {item!r} must be batch:dtype with batch >= 2 and dtype in "
                             f"{', '.join(DTYPES)}, e.g. 64:float32")
        settings.append((int(batch), dtype))
    return settings


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
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--no-crd", dest="crd", action="store_false", help="skip the CRD-versus-KD measurement")
    p.add_argument("--crd-setting", default=None, help="batch:dtype of the CRD comparison (default 64:float32; "
                                                       "quick the first setting)")
    p.add_argument("--quick", action="store_true", help="tiny models and data, a few steps: a CPU smoke run")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kd_step_<device>_<date>.json)")
    args = p.parse_args(argv)
    q = args.quick
    args.pair_list = parse_pairs(args.pairs or ("resnet8:resnet8" if q else "resnet56:resnet20,vgg13:vgg8"))
    args.setting_list = parse_settings(args.settings or ("16:float32" if q else "64:float32,512:bfloat16"))
    args.chunk = args.chunk or (4 if q else 100)
    args.steps = args.steps or (8 if q else 500)
    args.repeats = args.repeats or (2 if q else 3)
    args.num_train = args.num_train or (512 if q else 50000)
    args.image_size = args.image_size or (16 if q else 32)
    args.crd_batch, args.crd_dtype = parse_settings(args.crd_setting)[0] if args.crd_setting else (
        args.setting_list[0] if q else (64, "float32"))
    augment.check_name(args.aug)
    if args.steps % args.chunk:
        p.error(f"--steps ({args.steps}) must be a multiple of --chunk ({args.chunk})")
    largest = max([b for b, _ in args.setting_list] + [args.crd_batch])
    if args.num_train < largest * args.chunk:
        p.error(f"--num-train ({args.num_train}) must hold one chunk of the largest batch ({largest} x {args.chunk})")
    return args


class Case:
    """One (pair, batch, dtype, distiller): the step, its initial state and the teacher's variables."""

    def __init__(self, teacher_name, student_name, batch, dtype, distiller_name, dataset, data, mesh, aug):
        self.batch = batch
        size, classes = dataset.image_size, dataset.num_classes
        student = models.create(student_name, classes, size, DTYPES[dtype])
        teacher = models.create(teacher_name, classes, size, DTYPES[dtype])
        tx, _ = recipe.make_optimizer(0.05, dataset.num_train // batch, (150, 180, 210))
        scheme = augment.create(aug, dataset_stats=dataset, n_pick=batch)
        distiller = distillers.create(distiller_name)
        w = distillers.resolve_weights(distiller, aug)
        weights = steps.KDWeights(gamma=w["gamma"], alpha=w["alpha"], beta=w["beta"])
        prepare = steps.make_prepare(dataset.mean, dataset.std, transforms.default_pad(size))
        self.step_fn = steps.make_kd_step(student, teacher, tx, prepare, scheme, weights, classes,
                                          distiller=distiller)
        key = jax.random.key(0)
        state = common.init_state(student, tx, jax.random.fold_in(key, 0), size)
        teacher_vars = {k: v for k, v in common.init_state(teacher, tx, jax.random.fold_in(key, 1), size).items()
                        if k in ("params", "batch_stats")}
        state["extra"] = init_extra(distiller, tx, jax.random.fold_in(key, 2), student,
                                    {"params": state["params"], "batch_stats": state["batch_stats"]}, teacher,
                                    teacher_vars, batch, dataset)
        replicated = NamedSharding(mesh, P())
        self.initial_state = jax.device_put(state, replicated)
        self.teacher_vars = jax.device_put(teacher_vars, replicated)
        self.data, self.mesh = data, mesh
        self.perm = jax.device_put(jax.random.permutation(jax.random.key(3), dataset.num_train), replicated)
        self.step_key = jax.random.key(4)
        self.steps_per_epoch = dataset.num_train // batch

    def fresh_state(self):
        return jax.tree.map(jnp.copy, self.initial_state)  # the drivers donate their state

    def time_single(self, steps_per_window, repeats):
        fn = loop.make_chunk_fn(self.step_fn, 1, self.batch)  # one step per dispatch, no loop
        state = self.fresh_state()
        args = (state, self.teacher_vars, self.data, self.perm, 0, 0, self.step_key)
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        state, _ = compiled(*args)  # warm-up
        jax.block_until_ready(state)
        windows, step = [], 1
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps_per_window):
                first = (step % self.steps_per_epoch) * self.batch
                state, metrics = compiled(state, self.teacher_vars, self.data, self.perm, first, step, self.step_key)
                step += 1
            jax.block_until_ready((state, metrics))
            windows.append(time.perf_counter() - t0)
        return compile_s, windows, float(jax.device_get(metrics["loss"])[-1])

    def time_chunk(self, chunk, steps_per_window, repeats):
        fn = loop.make_chunk_fn(self.step_fn, chunk, self.batch)
        state = self.fresh_state()
        args = (state, self.teacher_vars, self.data, self.perm, 0, 0, self.step_key)
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = compiled(*args)  # warm-up
        jax.device_get(metrics)
        starts = self.steps_per_epoch - chunk + 1  # chunk starts that stay inside one epoch's permutation
        windows, step = [], chunk
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps_per_window // chunk):
                first = (step % starts) * self.batch
                state, metrics = compiled(state, self.teacher_vars, self.data, self.perm, first, step, self.step_key)
                metrics = jax.device_get(metrics)  # the one transfer per chunk, as in loop.fit
                step += chunk
            jax.block_until_ready(state)
            windows.append(time.perf_counter() - t0)
        return compile_s, windows, float(np.asarray(metrics["loss"])[-1])


def row(pair, batch, dtype, distiller, driver, chunk, steps_per_window, compile_s, windows, loss):
    median = statistics.median(windows)
    return {"teacher": pair[0], "student": pair[1], "batch": batch, "dtype": dtype, "distiller": distiller,
            "driver": driver, "steps_per_dispatch": chunk, "compile_s": round(compile_s, 3),
            "window_s": [round(w, 6) for w in windows], "ms_per_step": 1e3 * median / steps_per_window,
            "img_per_s": batch * steps_per_window / median, "last_loss": loss}



def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    kind = device.device_kind
    mesh = jax.sharding.Mesh(np.array([device]), ("data",))  # one device: the per-card figure
    dataset = load_synthetic(image_size=args.image_size, num_classes=args.num_classes, num_train=args.num_train,
                             num_test=args.num_classes)
    data = DeviceDataset.create(dataset, mesh, placement="replicated")
    print(f"device: {kind}  jax {jax.__version__}  aug {args.aug}  {args.num_train} x {args.image_size}x"
          f"{args.image_size}  window {args.steps} steps x {args.repeats}  chunk {args.chunk}")
    header = (f"{'pair':<22} {'batch':>5} {'dtype':<9} {'distiller':<9} {'driver':<7} {'compile s':>9} "
              f"{'ms/step':>9} {'img/s':>10}")
    print(header)
    print("-" * len(header))
    rows, summary = [], []

    def record(r):
        rows.append(r)
        print(f"{r['teacher'] + '->' + r['student']:<22} {r['batch']:>5} {r['dtype']:<9} {r['distiller']:<9} "
              f"{r['driver']:<7} {r['compile_s']:>9.1f} {r['ms_per_step']:>9.3f} {r['img_per_s']:>10,.0f}",
              flush=True)
        return r

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
            if args.crd and (batch, dtype) == (args.crd_batch, args.crd_dtype):
                crd_case = Case(*pair, batch, dtype, "crd", dataset, data, mesh, args.aug)
                crd = record(row(pair, batch, dtype, "crd", "chunk", args.chunk, args.steps,
                                 *crd_case.time_chunk(args.chunk, args.steps, args.repeats)))
                entry.update(crd_img_per_s=crd["img_per_s"], crd_cost_ratio=chunk["img_per_s"] / crd["img_per_s"],
                             crd_target_ratio=CRD_TARGET_RATIO)
                del crd_case
            summary.append(entry)
            del case

    print()
    for e in summary:
        line = (f"{e['teacher']}->{e['student']} batch {e['batch']} {e['dtype']}: chunk {e['chunk_img_per_s']:,.0f} "
                f"img/s, {e['chunk_speedup']:.2f}x the one-step-per-dispatch loop")
        if "target_img_per_s" in e:
            line += (f"; {e['x_pytorch_h100']:.1f}x the PyTorch H100 figure {e['pytorch_h100_img_per_s']:,.0f} "
                     f"(target {e['target_img_per_s']:,.0f} on an H100)")
        if "crd_cost_ratio" in e:
            line += f"; CRD step cost {e['crd_cost_ratio']:.2f}x KD (target <= {CRD_TARGET_RATIO})"
        print(line)

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
        "img_per_s": "original images per second: batch x steps / seconds (the step also runs x')",
        "command": " ".join(["bench/kd_step.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "summary": summary,
        "results": rows,
    }
    write_json(result, args.out or output_path("kd_step", kind, args.quick))
    return result


if __name__ == "__main__":
    main()

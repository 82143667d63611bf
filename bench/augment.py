"""Throughput (images/s) of the augmentation schemes and of the base training transform.

    python bench/augment.py                      # every scheme, batch 64 and 1024, 32x32
    python bench/augment.py --schemes cutout,cutmix --batches 256 --image-size 64
    python bench/augment.py --quick              # CPU smoke run: batch 64 and 256, 3 timed calls

Each scheme is jitted once per batch size and compiled ahead of time (compile time is reported, never counted
as throughput); the timed calls use a fresh key each, end with ``block_until_ready``, and the median is reported.
Images/s counts input images per second. CutMixPick is timed with a cheap score_fn (mean pixel value of each
pool image) so that the number is the scheme's own cost, without the scoring model's forward pass.
``base_crop_flip`` is the loader's per-sample crop+flip on uint8 plus normalisation, which every step runs
before its scheme. The table goes to stdout and a JSON file to
``bench/results/augment_<device kind>_<date>[_quick].json``.
"""
import argparse
import datetime
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from results_io import output_path, write_json  # noqa: E402  (bench/ is on sys.path when run as a script)
from kdjax import augment
from kdjax.augment import transforms

BASE_ROW = "base_crop_flip"
CIFAR100_STATS = {"mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)}
IMAGENET_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default="all", help="comma-separated scheme names, or 'all' (the nine + base)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,1024; quick 64,256)")
    p.add_argument("--image-size", type=int, default=32, help="32 (CIFAR statistics) or 64 (ImageNet statistics)")
    p.add_argument("--per-sample", action="store_true", help="per-image draws instead of one per batch")
    p.add_argument("--runs", type=int, default=None, help="timed calls, median reported (default 20; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after compiling (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="small batches and few calls, for a CPU smoke run")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/augment_<device>_<date>.json)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in (args.batches or ("64,256" if args.quick else "64,1024")).split(",")]
    args.runs = args.runs or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.schemes == "all":
        args.scheme_names = [BASE_ROW] + augment.names()[:9]
    else:
        args.scheme_names = [s.strip() for s in args.schemes.split(",") if s.strip()]
        for name in args.scheme_names:
            if name != BASE_ROW:
                augment.check_name(name)
    if min(args.batch_sizes) < 2 or args.runs < 1 or args.image_size < 8:
        p.error("--batches must be >= 2 (mixing needs pairs), --runs >= 1, --image-size >= 8")
    return args


def cheap_score_fn(pool):
    """Stands in for the scoring model: one number per pool image, no network."""
    return jnp.mean(pool, axis=(1, 2, 3)), None


def build(name, stats, per_sample):
    """fn(key, images_uint8, labels) -> output array, the thing to time."""
    if name == BASE_ROW:
        pad = transforms.default_pad(stats["image_size"])

        def fn(key, images_uint8, labels):
            del labels
            return transforms.normalize(transforms.base_train_transform(key, images_uint8, pad), stats["mean"], stats["std"])
        return fn, False
    scheme = augment.create(name, dataset_stats=stats, per_sample=per_sample)
    score_fn = cheap_score_fn if scheme.needs_score_fn else None

    def fn(key, images, labels):
        return scheme(key, images, labels, score_fn)[0]
    return fn, True


def bench_one(name, batch, args, stats):
    rng = np.random.RandomState(batch)
    images_uint8 = jnp.asarray(rng.randint(0, 256, (batch, args.image_size, args.image_size, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.randint(0, 10, (batch,)).astype(np.int32))
    fn, takes_normalised = build(name, stats, args.per_sample)
    inputs = transforms.normalize(images_uint8, stats["mean"], stats["std"]) if takes_normalised else images_uint8
    inputs = jax.block_until_ready(inputs)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(jax.random.key(0), inputs, labels).compile()
    compile_s = time.perf_counter() - start
    keys = [jax.random.key(i) for i in range(args.warmup + args.runs)]
    for key in keys[:args.warmup]:
        jax.block_until_ready(compiled(key, inputs, labels))
    times = []
    for key in keys[args.warmup:]:
        start = time.perf_counter()
        jax.block_until_ready(compiled(key, inputs, labels))
        times.append(time.perf_counter() - start)
    return compile_s, sorted(times)




def main(argv=None):
    args = parse_args(argv)
    kind = jax.devices()[0].device_kind
    stats = dict(CIFAR100_STATS if args.image_size < 64 else IMAGENET_STATS, image_size=args.image_size)
    mode = "per-sample draws" if args.per_sample else "one draw per batch"
    print(f"device: {kind} ({jax.device_count()} visible, using 1)  jax {jax.__version__}  "
          f"{args.image_size}x{args.image_size}  {mode}  median of {args.runs}")
    header = f"{'scheme':<15} {'batch':>6} {'compile s':>9} {'ms/call':>9} {'img/s':>13}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.scheme_names:
        for batch in args.batch_sizes:
            compile_s, times = bench_one(name, batch, args, stats)
            median = statistics.median(times)
            row = {"scheme": name, "batch": batch, "compile_s": round(compile_s, 3), "median_s": median,
                   "min_s": times[0], "max_s": times[-1], "img_per_s": batch / median}
            rows.append(row)
            print(f"{name:<15} {batch:>6} {compile_s:>9.1f} {median * 1e3:>9.3f} {row['img_per_s']:>13,.0f}",
                  flush=True)
    result = {
        "benchmark": "augmentation schemes",
        "device_kind": kind,
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "image_size": args.image_size,
        "per_sample": args.per_sample,
        "batches": args.batch_sizes,
        "runs": args.runs,
        "warmup": args.warmup,
        "quick": args.quick,
        "score_fn": "mean pixel of each pool image (scoring forward excluded)",
        "command": " ".join(sys.argv),
        "results": rows,
    }
    write_json(result, args.out or output_path("augment", kind, args.quick))
    return result


if __name__ == "__main__":
    main()

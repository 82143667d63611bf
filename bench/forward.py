"""Eval-mode forward throughput (images/s) of every model in the zoo.

    python bench/forward.py                         # all models, batch 1024, float32, 32x32, 100 classes
    python bench/forward.py --dtype float32,bfloat16 --models resnet56,vgg13
    python bench/forward.py --image-size 64 --num-classes 200
    python bench/forward.py --quick                 # CPU smoke run: batch 32, 2 timed runs
    python bench/forward.py --models imagenet --image-size 224 --num-classes 1000 --batch 256   # the ImageNet zoo

Each model's forward is compiled ahead of time (compile time is reported, never timed as throughput), run a few
times to warm up, then timed ``--runs`` times with ``block_until_ready``; the median is reported. The table goes to
stdout and a JSON file to ``bench/results/forward_<device kind>_<date>[_quick].json``.
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

from results_io import output_path, write_json  # noqa: E402  (bench/ is on sys.path when run as a script)
from kdjax import models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all", help="comma-separated zoo names, 'all' (the CIFAR/Tiny ImageNet zoo) "
                                                    "or 'imagenet' (the *_imagenet models)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default 1024; 32 with --quick)")
    p.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated: float32, bfloat16")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--runs", type=int, default=None, help="timed runs, median reported (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs after compiling (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="small batch and few runs, for a CPU smoke test")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/forward_<device>_<date>.json)")
    args = p.parse_args(argv)
    args.batch = args.batch or (32 if args.quick else 1024)
    args.runs = args.runs or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    # 'all' keeps the rows (and the device check's time) it had before the ImageNet models, which 32 px does not suit
    groups = {"all": [m for m in models.names() if not m.endswith("_imagenet")],
              "imagenet": [m for m in models.names() if m.endswith("_imagenet")]}
    args.model_names = groups.get(args.models) or [m.strip() for m in args.models.split(",")]
    for name in args.model_names:
        models.check_name(name)
    args.dtype_names = [d.strip() for d in args.dtype.split(",")]
    for d in args.dtype_names:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    if args.batch < 1 or args.runs < 1:
        p.error("--batch and --runs must be positive")
    return args



def bench_model(name, dtype, args, images):
    """Compile time, the sorted per-run seconds, and the parameter count of one model's eval forward."""
    model = models.create(name, args.num_classes, args.image_size, dtype=DTYPES[dtype])
    variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    start = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        compiled(variables, images).block_until_ready()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        compiled(variables, images).block_until_ready()
        times.append(time.perf_counter() - start)
    return compile_s, sorted(times), n_params



def main(argv=None):
    args = parse_args(argv)
    kind = jax.devices()[0].device_kind
    images = jax.random.normal(jax.random.key(1), (args.batch, args.image_size, args.image_size, 3), jnp.float32)
    rows = []
    header = f"{'model':<14} {'dtype':<9} {'params':>11} {'compile s':>9} {'ms/batch':>10} {'img/s':>12}"
    print(f"device: {kind} ({jax.device_count()} visible, using 1)  jax {jax.__version__}  batch {args.batch}  "
          f"{args.image_size}x{args.image_size}  {args.num_classes} classes  median of {args.runs}")
    print(header)
    print("-" * len(header))
    for dtype in args.dtype_names:
        for name in args.model_names:
            compile_s, times, n_params = bench_model(name, dtype, args, images)
            median = statistics.median(times)
            row = {"model": name, "dtype": dtype, "params": n_params, "compile_s": round(compile_s, 3),
                   "median_s": median, "min_s": times[0], "max_s": times[-1], "img_per_s": args.batch / median}
            rows.append(row)
            print(f"{name:<14} {dtype:<9} {n_params:>11,} {compile_s:>9.1f} {median * 1e3:>10.2f} "
                  f"{row['img_per_s']:>12,.0f}", flush=True)
    result = {
        "benchmark": "eval forward",
        "device_kind": kind,
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch": args.batch,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "dtypes": args.dtype_names,
        "runs": args.runs,
        "warmup": args.warmup,
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "results": rows,
    }
    write_json(result, args.out or output_path("forward", kind, args.quick))
    return result


if __name__ == "__main__":
    main()

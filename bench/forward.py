"""Eval-mode forward throughput (images/s) of every model in the zoo.

    python bench/forward.py                         # all models, batch 1024, float32, 32x32, 100 classes
    python bench/forward.py --dtype float32,bfloat16 --models resnet56,vgg13
    python bench/forward.py --image-size 64 --num-classes 200
    python bench/forward.py --quick                 # CPU smoke run: batch 32, 2 timed runs
    python bench/forward.py --models imagenet --image-size 224 --num-classes 1000 --batch 256   # the ImageNet zoo
    python bench/forward.py --vs-torchvision        # CPU: resnet18_imagenet beside torchvision's resnet18, same run

Each model's forward is compiled ahead of time (compile time is reported, never timed as throughput), run a few
times to warm up, then timed ``--runs`` times with ``block_until_ready``; the median is reported. The table goes to
stdout and a JSON file to ``bench/results/forward_<device kind>_<date>[_quick].json``.

``--vs-torchvision`` times kdjax's ``resnet18_imagenet`` (default; ``--models`` names other ``*_imagenet`` models)
against torchvision's model of the same architecture in the same run: torchvision runs in a child process started
with ``--torch-python`` (default: the ``KDJAX_TORCH_PYTHON`` environment variable; without a python that imports
torch and torchvision the comparison is skipped with one line), both on random weights, eval mode, float32,
NCHW for torch and NHWC for JAX, each with the host's threads. The windows are interleaved (kdjax, torchvision,
torchvision, kdjax, ...: who goes first alternates) so that load on a shared machine weighs on both alike; each
window runs ``--runs`` forwards, and the median window of each side gives img/s and the ratio kdjax /
torchvision. Defaults for this mode: batch 32, 224 px, 1000 classes, 5 windows of 3 forwards.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

# bench/ is on sys.path when run as a script
from results_io import TORCH_PYTHON_ENV, default_torch_python, output_path, write_json  # noqa: E402
from kdjax import models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all", help="comma-separated zoo names, 'all' (the CIFAR/Tiny ImageNet zoo) "
                                                    "or 'imagenet' (the *_imagenet models)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default 1024; 32 with --quick)")
    p.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated: float32, bfloat16")
    p.add_argument("--image-size", type=int, default=None, help="default 32 (224 with --vs-torchvision)")
    p.add_argument("--num-classes", type=int, default=None, help="default 100 (1000 with --vs-torchvision)")
    p.add_argument("--runs", type=int, default=None, help="timed runs, median reported (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs after compiling (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="small batch and few runs, for a CPU smoke test")
    p.add_argument("--vs-torchvision", action="store_true",
                   help="time the ImageNet ResNet beside torchvision's in the same run, interleaved windows (CPU)")
    p.add_argument("--torch-python", default=None,
                   help=f"python with torch and torchvision for --vs-torchvision (default: ${TORCH_PYTHON_ENV})")
    p.add_argument("--windows", type=int, default=5, help="--vs-torchvision: interleaved windows per side")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/forward_<device>_<date>.json)")
    args = p.parse_args(argv)
    if args.vs_torchvision:
        return vs_torchvision_args(p, args)
    args.image_size = args.image_size or 32
    args.num_classes = args.num_classes or 100
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



# ------------------------------------------------------------------------------ --vs-torchvision (one home)

# The child process: builds torchvision's model and, for each "run N" line on stdin, times N forwards of one batch
# and answers the seconds as JSON. Random weights; throughput does not depend on their values.
TORCH_WORKER = r"""
import json, sys, time
import torch, torchvision
name, batch, size, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = getattr(torchvision.models, name)(num_classes=classes).eval()
x = torch.randn(batch, 3, size, size)
with torch.inference_mode():
    model(x)  # warm-up
    print(json.dumps({"ready": True, "torch": torch.__version__, "torchvision": torchvision.__version__,
                      "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
"""


def vs_torchvision_args(p, args):
    """Defaults and checks of --vs-torchvision: the ImageNet models that torchvision has, 224 px, float32."""
    args.model_names = ["resnet18_imagenet"] if args.models == "all" else [m.strip() for m in args.models.split(",")]
    for name in args.model_names:
        models.check_name(name)
        if torchvision_name(name) is None:
            p.error(f"--vs-torchvision: {name} has no torchvision counterpart (resnet18/34/50_imagenet)")
    args.batch = args.batch or 32
    args.runs = args.runs or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.windows = 2 if args.quick and args.windows == 5 else args.windows
    args.image_size = args.image_size or 224
    args.num_classes = args.num_classes or 1000
    args.dtype_names = ["float32"]
    if args.dtype != "float32":
        p.error("--vs-torchvision compares float32 forwards only")
    if min(args.batch, args.runs, args.windows) < 1:
        p.error("--batch, --runs and --windows must be positive")
    args.torch_python = args.torch_python or default_torch_python()
    return args


def torchvision_name(name):
    return {"resnet18_imagenet": "resnet18", "resnet34_imagenet": "resnet34",
            "resnet50_imagenet": "resnet50"}.get(name)


class TorchForward:
    """torchvision's forward in a child process (``TORCH_WORKER``): ``window(n)`` -> seconds of n forwards."""

    def __init__(self, python, name, batch, size, classes):
        self.proc = subprocess.Popen([python, "-c", TORCH_WORKER, name, str(batch), str(size), str(classes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torchvision process ended (rc {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def window(self, n):
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def torch_python_problem(python):
    """'' when ``python`` imports torch and torchvision, else why it cannot be used."""
    if not python:
        return f"no --torch-python given and {TORCH_PYTHON_ENV} is unset"
    try:
        done = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} does not run ({type(e).__name__}: {e})"
    if done.returncode:
        return f"{python} cannot import torch and torchvision ({(done.stderr.strip().splitlines() or ['?'])[-1]})"
    return ""


def compare_with_torchvision(args):
    """Rows of kdjax vs torchvision img/s on the same batch, interleaved windows, medians and their ratio."""
    problem = torch_python_problem(args.torch_python)
    if problem:
        print(f"--vs-torchvision skipped: {problem}; give --torch-python=PYTHON with torch and torchvision")
        return [], problem
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32))
    rows = []
    print(f"kdjax vs torchvision eval forward: batch {args.batch}, {args.image_size}x{args.image_size}, float32, "
          f"{args.windows} interleaved windows of {args.runs} forwards each, torch from {args.torch_python}")
    header = (f"{'model':<18} {'kdjax img/s':>12} {'torchvision img/s':>18} {'ratio':>7}  "
              f"{'ratio per window [min, max]':<28}")
    print(header)
    for name in args.model_names:
        model = models.create(name, args.num_classes, args.image_size, dtype=jnp.float32)
        variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.key(0))
        t0 = time.perf_counter()
        compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            compiled(variables, images).block_until_ready()

        def kdjax_window():
            start = time.perf_counter()
            for _ in range(args.runs):
                out = compiled(variables, images)
            out.block_until_ready()
            return time.perf_counter() - start

        torch_side = TorchForward(args.torch_python, torchvision_name(name), args.batch, args.image_size,
                                  args.num_classes)
        try:
            ours, theirs = [], []
            for i in range(args.windows):  # who goes first alternates
                if i % 2 == 0:
                    ours.append(kdjax_window())
                    theirs.append(torch_side.window(args.runs))
                else:
                    theirs.append(torch_side.window(args.runs))
                    ours.append(kdjax_window())
        finally:
            torch_side.close()
        per_image = args.batch * args.runs
        ratios = [t / o for o, t in zip(ours, theirs)]
        row = {"model": name, "torchvision_model": torchvision_name(name), "dtype": "float32",
               "compile_s": round(compile_s, 3), "kdjax_window_s": [round(w, 6) for w in ours],
               "torchvision_window_s": [round(w, 6) for w in theirs],
               "kdjax_img_per_s": per_image / statistics.median(ours),
               "torchvision_img_per_s": per_image / statistics.median(theirs),
               "ratio_per_window": [round(r, 4) for r in ratios], **{f"torch_{k}": v for k, v in
                                                                       torch_side.info.items() if k != "ready"}}
        row["ratio"] = row["kdjax_img_per_s"] / row["torchvision_img_per_s"]
        rows.append(row)
        print(f"{name:<18} {row['kdjax_img_per_s']:>12,.1f} {row['torchvision_img_per_s']:>18,.1f} "
              f"{row['ratio']:>6.2f}x  [{min(ratios):.2f}, {max(ratios):.2f}]  (torch {row['torch_torch']}, "
              f"{row['torch_threads']} threads; params {row['torch_params']:,})", flush=True)
    return rows, ""


def main_vs_torchvision(args):
    kind = jax.devices()[0].device_kind
    print(f"device: {kind}  jax {jax.__version__}  host cores {os.cpu_count()}  load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows, skipped = compare_with_torchvision(args)
    result = {"benchmark": "eval forward, kdjax vs torchvision", "device_kind": kind,
              "platform": jax.devices()[0].platform, "jax": jax.__version__, "flax": flax.__version__,
              "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "batch": args.batch, "image_size": args.image_size, "num_classes": args.num_classes,
              "runs_per_window": args.runs, "windows": args.windows, "host_cores": os.cpu_count(),
              "load_average_at_start": os.getloadavg(), "torch_python": args.torch_python, "skipped": skipped,
              "quick": args.quick, "command": " ".join(sys.argv), "results": rows,
              "ratio": "kdjax img/s / torchvision img/s, each the median of its interleaved windows"}
    write_json(result, args.out or output_path("forward-vs-torchvision", kind, args.quick))
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.vs_torchvision:
        return main_vs_torchvision(args)
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

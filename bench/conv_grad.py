"""One student pass (forward + backward, train mode) with XLA's convolution weight gradients against other ways
of computing them, alternated in one process (bench/NOTES.md, "CPU: weight gradients from materialised inputs").

    taskset -c 1 python bench/conv_grad.py                      # resnet20, batch 128, 32 px, float32
    taskset -c 1 python bench/conv_grad.py --quick              # resnet8, batch 16: a smoke run (seconds)
    taskset -c 1 python bench/conv_grad.py --variants default,materialized,gemm_slices,gemm_im2col

Each variant is compiled ahead of time (its compile seconds reported), warmed up, then the variants' windows of
``--runs`` passes alternate (who goes first rotates) ``--windows`` times, so that load on a shared machine weighs
on all alike. A pass's cost is process CPU seconds (``time.process_time``, all of the process's threads) and wall
seconds; each variant's median window and [min, max] are reported with the load average. Run it pinned to one core
(``taskset -c 1``): the figure is then per core. It also prints each variant's gradient against the first
variant's (max |difference| / max |reference| over each parameter, the largest over parameters) and counts in each
compiled program the fusions with a transpose (and those of them that recompute a chain: more than one large
operand), the convolutions, dots and conditionals. The JSON goes to bench/results/conv_grad_<device>_<date>.json.

Variants (the policy ``KDJAX_CPU_CONV_GRAD`` forced off for ``default``, on for the others, which swap the weight
gradient that ``kdjax.models.convolution``'s custom VJP calls):

* ``default``: flax's ``lax.conv_general_dilated``, XLA's weight gradients as XLA fuses them;
* ``materialized``: kdjax.models.convolution as it is: XLA's weight gradient from a materialised input;
* ``materialized_xg``: the output gradient materialised too;
* ``opt_barrier``: ``lax.optimization_barrier`` in place of ``materialize`` (XLA:CPU removes it before fusion);
* ``gemm_slices``: one ``dot_general`` per kernel offset, a strided window of the padded input against the
  output gradient, contracting N, Ho, Wo (no convolution);
* ``gemm_im2col``: the K*K windows concatenated on the channel axis, one ``dot_general``.
"""
import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

# bench/ is on sys.path when run as a script
from results_io import cpu_model, output_path, write_json  # noqa: E402
from kdjax import models, parallel
from kdjax.models import convolution

VARIANTS = ("default", "materialized", "materialized_xg", "opt_barrier", "gemm_slices", "gemm_im2col")
LIBRARY_GRADIENT = convolution.weight_gradient


def xla_gradient(lhs, rhs, g, options):
    """XLA's weight gradient of the convolution, from lhs as given."""
    return jax.vjp(lambda r: convolution._convolve(lhs, r, options), rhs)[1](g)[0]


def materialized_xg_gradient(lhs, rhs, g, options):
    """As the library's, with the output gradient materialised too."""
    return xla_gradient(convolution.materialize(lhs), rhs, convolution.materialize(g), options)


def opt_barrier_gradient(lhs, rhs, g, options):
    """An optimization barrier in place of ``materialize``: XLA:CPU removes it before fusion."""
    return xla_gradient(lax.optimization_barrier(lhs), rhs, g, options)


def _windows(lhs, g, kernel_hw, options):
    """For each kernel offset (kh, kw), the input pixels it meets: a strided window of the padded input,
    [N, Ho, Wo, Cin] (NHWC, no dilation, one group)."""
    (sh, sw), padding = options["window_strides"], options["padding"]
    x_pad = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    n, ho, wo, c = g.shape[0], g.shape[1], g.shape[2], lhs.shape[-1]
    return [lax.slice(x_pad, (0, kh, kw, 0), (n, kh + (ho - 1) * sh + 1, kw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            for kh in range(kernel_hw[0]) for kw in range(kernel_hw[1])]


CONTRACT_NHW = (((0, 1, 2), (0, 1, 2)), ((), ()))  # over N, Ho, Wo of both operands: [Cin, Cout]


def gemm_slices_gradient(lhs, rhs, g, options):
    """dW[kh, kw] = window(kh, kw)^T g, one GEMM per kernel offset over N*Ho*Wo, stacked to HWIO."""
    kh, kw, cin, cout = rhs.shape
    dots = [lax.dot_general(w, g, CONTRACT_NHW) for w in _windows(lhs, g, (kh, kw), dict(options))]
    return jnp.stack(dots).reshape(kh, kw, cin, cout).astype(rhs.dtype)


def gemm_im2col_gradient(lhs, rhs, g, options):
    """The K*K windows side by side on the channel axis, [N, Ho, Wo, K*K*Cin], then one GEMM with g."""
    kh, kw, cin, cout = rhs.shape
    cols = jnp.concatenate(_windows(lhs, g, (kh, kw), dict(options)), axis=-1)
    return lax.dot_general(cols, g, CONTRACT_NHW).reshape(kh, kw, cin, cout).astype(rhs.dtype)


GRADIENTS = {"materialized": LIBRARY_GRADIENT, "materialized_xg": materialized_xg_gradient,
             "opt_barrier": opt_barrier_gradient, "gemm_slices": gemm_slices_gradient,
             "gemm_im2col": gemm_im2col_gradient}


def use_variant(name):
    """Trace with this variant: the policy forced by its environment variable, the library's weight gradient
    swapped for the variant's (a benchmark-only patch of the module attribute the custom VJP calls)."""
    os.environ[parallel.CONV_GRAD_ENV] = "0" if name == "default" else "1"
    convolution.weight_gradient = GRADIENTS.get(name, LIBRARY_GRADIENT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="zoo name (default resnet20; quick resnet8)")
    p.add_argument("--batch", type=int, default=None, help="default 128; quick 16")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--variants", default="default,materialized", help=f"comma-separated, first is the reference: "
                                                                 f"{', '.join(VARIANTS)}")
    p.add_argument("--runs", type=int, default=None, help="passes per window (default 5; quick 2)")
    p.add_argument("--windows", type=int, default=None, help="windows per variant (default 5; quick 2)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.model = args.model or ("resnet8" if args.quick else "resnet20")
    args.batch = args.batch or (16 if args.quick else 128)
    args.runs = args.runs or (2 if args.quick else 5)
    args.windows = args.windows or (2 if args.quick else 5)
    args.variant_names = [v.strip() for v in args.variants.split(",")]
    for v in args.variant_names:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    return args


def make_pass(model):
    """Train-mode forward + backward of a cross-entropy loss: (loss, grads, new batch statistics)."""
    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    def one_pass(params, batch_stats, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        return loss, grads, stats

    return one_pass


def _elements(shape_text):
    dims = re.match(r"\w+\[([\d,]*)\]", shape_text)
    return int(np.prod([int(d) for d in dims.group(1).split(",") if d])) if dims else 0


def hlo_counts(text):
    """In the compiled program's entry computation: the fusions that contain a transpose, those of them that read
    more than one large tensor (at least a quarter of their output: a recomputed chain, not a copy), and the
    convolutions, dots and conditionals."""
    computations, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = "ENTRY" if head.group(1) else head.group(2)
            computations[current] = []
        elif current:
            computations[current].append(line)
    sizes, counts = {}, {"transpose_fusions": 0, "recomputing_transposes": 0, "convolutions": 0, "dots": 0,
                         "conditionals": 0}
    for line in computations.get("ENTRY", []):
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*)", line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        sizes[name] = _elements(shape)
        calls = re.search(r"calls=%([\w.-]+)", rest)
        body = "\n".join(computations.get(calls.group(1), [])) if calls else ""
        if op == "fusion" and " transpose(" in body:
            counts["transpose_fusions"] += 1
            operands = re.findall(r"%([\w.-]+)", rest.split("), ")[0])
            large = [o for o in operands if sizes.get(o, 0) * 4 >= sizes[name] > 0]
            counts["recomputing_transposes"] += len(large) > 1
        counts["convolutions"] += op == "convolution" or " convolution(" in body
        counts["dots"] += op == "dot" or " dot(" in body
        counts["conditionals"] += op == "conditional"
    return counts


def max_relative_error(reference, other):
    errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / max(float(jnp.max(jnp.abs(a))), 1e-30)),
                        reference, other)
    return max(jax.tree.leaves(errs))


def time_window(compiled, inputs, runs):
    """CPU and wall seconds per pass over ``runs`` passes."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(runs):
        jax.block_until_ready(compiled(*inputs))
    return (time.process_time() - cpu) / runs, (time.perf_counter() - wall) / runs


def main(argv=None):
    args = parse_args(argv)
    model = models.create(args.model, args.num_classes, args.image_size, jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, args.num_classes, size=args.batch))
    variables = model.init(jax.random.key(0), x, train=False)
    inputs = (variables["params"], variables["batch_stats"], x, y)
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, float32; jax {jax.__version__}, "
          f"{cpu_model()}, affinity {sorted(os.sched_getaffinity(0))}, load {os.getloadavg()}", flush=True)

    compiled, facts, outputs = {}, {}, {}
    for name in args.variant_names:
        use_variant(name)
        t0 = time.perf_counter()
        compiled[name] = jax.jit(make_pass(model)).lower(*inputs).compile()
        facts[name] = {"compile_s": round(time.perf_counter() - t0, 2), **hlo_counts(compiled[name].as_text())}
        outputs[name] = jax.block_until_ready(compiled[name](*inputs))  # also the warm-up
        jax.block_until_ready(compiled[name](*inputs))
    os.environ.pop(parallel.CONV_GRAD_ENV, None)
    convolution.weight_gradient = LIBRARY_GRADIENT
    reference = args.variant_names[0]
    for name in args.variant_names:
        loss, grads, stats = outputs[name]
        facts[name]["loss"] = float(loss)
        facts[name]["grad_max_rel_err"] = max_relative_error(outputs[reference][1], grads)
        facts[name]["batch_stats_max_rel_err"] = max_relative_error(outputs[reference][2], stats)
        print(f"{name:15s} compile {facts[name]['compile_s']:5.1f} s  transpose fusions "
              f"{facts[name]['transpose_fusions']:3d} (recomputing {facts[name]['recomputing_transposes']:2d})  "
              f"convolutions {facts[name]['convolutions']:3d}  dots {facts[name]['dots']:3d}  conditionals "
              f"{facts[name]['conditionals']:2d}  loss {facts[name]['loss']:.7f}  grad max rel err vs {reference} "
              f"{facts[name]['grad_max_rel_err']:.2e}", flush=True)

    windows = {name: [] for name in args.variant_names}
    loads = [os.getloadavg()[0]]
    for w in range(args.windows):
        k = w % len(args.variant_names)
        for name in args.variant_names[k:] + args.variant_names[:k]:  # who goes first rotates
            windows[name].append(time_window(compiled[name], inputs, args.runs))
        loads.append(os.getloadavg()[0])
        print(f"window {w}: " + "  ".join(f"{n} {windows[n][-1][0] * 1e3:.0f} ms cpu" for n in args.variant_names)
              + f"  load {loads[-1]:.2f}", flush=True)

    summary = {}
    for name in args.variant_names:
        cpu = [c for c, _ in windows[name]]
        wall = [s for _, s in windows[name]]
        summary[name] = {"cpu_s_median": statistics.median(cpu), "cpu_s_min": min(cpu), "cpu_s_max": max(cpu),
                         "wall_s_median": statistics.median(wall), "windows_cpu_s": cpu, "windows_wall_s": wall}
    base = summary[reference]["cpu_s_median"]
    print(f"\nCPU s per pass (median [min, max] of {args.windows} windows x {args.runs} passes), load "
          f"{min(loads):.2f}-{max(loads):.2f}:")
    for name in args.variant_names:
        s = summary[name]
        print(f"  {name:15s} {s['cpu_s_median'] * 1e3:7.1f} ms [{s['cpu_s_min'] * 1e3:.1f}, "
              f"{s['cpu_s_max'] * 1e3:.1f}]  wall {s['wall_s_median'] * 1e3:.1f} ms  "
              f"x{s['cpu_s_median'] / base:.3f} of {reference}")
    result = {"bench": "conv_grad", "args": {k: v for k, v in vars(args).items() if k != "variant_names"},
              "variants": args.variant_names, "jax": jax.__version__, "cpu": cpu_model(),
              "affinity": sorted(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "load_average": loads, "facts": facts, "timing": summary}
    write_json(result, args.out or output_path("conv_grad", jax.devices()[0].device_kind, args.quick))
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()

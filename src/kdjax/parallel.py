"""Device meshes for data parallelism."""
from __future__ import annotations

import os
from typing import Sequence

import jax

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with the single axis ``"data"``.

    The axis type is Auto, not the Explicit that ``jax.make_mesh`` now defaults to: with Auto, jit and shard_map
    accept unsharded inputs and let the compiler propagate shardings, which is what the data-parallel step expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device; got an empty list")
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def convolutions_in_loops_are_slow() -> bool:
    """True on XLA:CPU, which runs a convolution inside a while loop (lax.scan) through a far slower path than
    outside one (jax issue #12868; measured here: 5.6 s against 0.1 s per resnet14 train step at 16x16, batch 64)."""
    return jax.default_backend() == "cpu"


CONV_GRAD_ENV = "KDJAX_CPU_CONV_GRAD"


def materialize_weight_gradient_inputs() -> bool:
    """Whether the zoo's convolutions compute their weight gradient from a materialised input
    (``kdjax.models.convolution``): on XLA:CPU, whose fusion pass otherwise recomputes the BatchNorm/ReLU/residual
    chain inside the transposes that feed each weight-gradient convolution (bench/NOTES.md). The results are the
    same convolutions' either way. ``KDJAX_CPU_CONV_GRAD=0`` or ``1`` overrides it (benchmarks, tests); read when a
    model is traced."""
    forced = os.environ.get(CONV_GRAD_ENV)
    if forced is not None:
        return forced.strip() == "1"
    return jax.default_backend() == "cpu"


def switches_schemes() -> bool:
    """Whether a run asked for ``scheme_switch`` runs the shared program of ``kdjax.augment.switch``: on XLA:CPU,
    where compiling is a large share of a run (bench/NOTES.md, "Compiles"). On accelerators a run's compile is a
    small share of its training, and a conditional inside the step's loop is unmeasured there (jax#5986 reports
    conditionals in scans slower on GPU before jaxlib 0.11.1), so each scheme keeps its own program."""
    return jax.default_backend() == "cpu"


def steps_per_dispatch(requested: int, unit: int = 1) -> int:
    """How many loop iterations (train steps, evaluation batches) one compiled dispatch runs: ``requested`` on
    accelerators; on XLA:CPU only ``unit``, the smallest block (one step; T. stddev's block of steps that share
    one teacher forward), with no loop around the convolutions. The one place that policy is decided."""
    return int(unit) if convolutions_in_loops_are_slow() else max(int(requested), int(unit))


_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_cache_counts = {"hits": 0, "misses": 0}
_cache_dir = None


def _count_cache_event(event: str, **kwargs) -> None:
    if event in _CACHE_EVENTS:
        _cache_counts[_CACHE_EVENTS[event]] += 1


def enable_compilation_cache(directory) -> None:
    """JAX's persistent compilation cache in ``directory/<device kind>``: runs that differ only in seed compile
    the same programs, so all but the first read them from disk. Every program is cached, however small or quick
    to compile (JAX skips programs under 1 s by default, which on CPU is most of them). Idempotent; None: off."""
    global _cache_dir
    if directory is None or _cache_dir is not None:
        return
    import os
    import re
    kind = re.sub(r"[^A-Za-z0-9_.-]+", "_", jax.devices()[0].device_kind) or "device"
    _cache_dir = os.path.join(os.path.abspath(os.path.expanduser(directory)), kind)
    os.makedirs(_cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.monitoring.register_event_listener(_count_cache_event)


def compilation_cache_counts() -> dict:
    """Persistent-cache hits and misses of this process so far (counted from JAX's own events)."""
    return dict(_cache_counts)


_DISTRIBUTED_READY = False

# What a run compiles, from JAX's own monitoring events: every XLA program (a backend compile, or its load from
# the persistent cache) and the time spent tracing, lowering and compiling. A task's own figures miss the
# programs compiled outside its timed spots (the model's init, the evaluator, an epoch's permutation).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILE_EVENTS = (_COMPILE_EVENT, "/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration")
_compile_spans = []  # (start, end) of each event: traces nest (a jitted function traced inside another's trace)
_compile_listening = False


def _record_compile_span(event: str, start_time: float, end_time: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_spans.append((event == _COMPILE_EVENT, start_time, end_time))


def count_compiles() -> dict:
    """A mark of the compiles so far, for ``compiles_since``; the first call starts the counting. Idempotent."""
    global _compile_listening
    if not _compile_listening:
        _compile_listening = True
        jax.monitoring.register_event_time_span_listener(_record_compile_span)
    return {"mark": len(_compile_spans)}


def compiles_since(before: dict) -> dict:
    """Programs compiled (or loaded from the persistent cache) since ``before`` (a ``count_compiles()``) and the
    seconds spent compiling: the union of the trace, lowering and compile spans, so that nested traces and
    programs compiled at once in threads count once."""
    spans = _compile_spans[before["mark"]:]
    seconds, reach = 0.0, float("-inf")
    for _, start, end in sorted(spans, key=lambda span: span[1]):
        seconds += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return {"programs": sum(is_program for is_program, _, _ in spans), "compile_s": seconds}


def compilation_cache_counts_since(before: dict) -> dict:
    """The cache's hit/miss counts since ``before`` (an earlier ``compilation_cache_counts()``): a run's own."""
    now = compilation_cache_counts()
    return {key: now[key] - before.get(key, 0) for key in now}


# How long a process waits at a barrier for the others (SLURM tasks start, import and compile at their own pace).
BARRIER_TIMEOUT_S = 900
_barriers_passed = 0


def wait_for_all_processes(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Block until every process of a multi-process run has reached this point; no-op in a single process.

    Called before a run's first cross-process collective: on CPU that collective also opens the gloo context, whose
    key exchange gives up after 30 s (fixed in XLA), so processes that arrive further apart than that (one still
    importing or compiling on a loaded machine) would fail. The coordination service's barrier waits as long as
    asked. Every process must pass the same barriers in the same order (the names are numbered to stay unique)."""
    global _barriers_passed
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    if not multihost.is_jax_distributed_client_initialized():
        return  # processes set up by a runtime without jax.distributed's coordination service: nothing to wait at
    _barriers_passed += 1
    multihost.get_barrier_sync_fn()(key=f"kdjax_{name}_{_barriers_passed}", timeout_ms=int(timeout_s * 1000))


def maybe_initialize_distributed() -> None:
    """Multi-host runs: ``jax.distributed.initialize()`` before anything touches a device, when

    * the run is a SLURM step of several tasks (``srun --ntasks=N`` with N > 1: ``SLURM_NTASKS`` and
      ``SLURM_STEP_NODELIST`` set); JAX reads the coordinator, process count and id from SLURM itself;
    * ``KDJAX_COORDINATOR`` (+ ``KDJAX_NUM_PROCESSES``, ``KDJAX_PROCESS_ID``) name a cluster by hand;
    * ``KDJAX_DISTRIBUTED=1`` asks for JAX's own auto-detection on another cluster manager.

    On CPU (tests, CPU clusters) the processes talk through gloo collectives (``KDJAX_CPU_COLLECTIVES`` chooses
    another). Single-process runs skip it. Idempotent."""
    import os
    global _DISTRIBUTED_READY
    if _DISTRIBUTED_READY:
        return
    _DISTRIBUTED_READY = True
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    in_slurm_step = slurm_tasks > 1 and "SLURM_STEP_NODELIST" in os.environ
    coordinator = os.environ.get("KDJAX_COORDINATOR")
    if not (coordinator or in_slurm_step or os.environ.get("KDJAX_DISTRIBUTED") == "1"):
        return
    collectives = os.environ.get("KDJAX_CPU_COLLECTIVES")
    if collectives is None and os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        collectives = "gloo"
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["KDJAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["KDJAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()

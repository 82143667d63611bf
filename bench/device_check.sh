#!/usr/bin/env bash
# bench/device_check.sh -- every accelerator benchmark the README and bench/NOTES.md promise, in ONE call that
# ends within 8 minutes on one H100/H200, offline, then one summary table (bench/summarize.py).
#
# Run (from any directory; the script works from the repository root):
#
#   bash bench/device_check.sh [WHEEL_DIR] [--only STEP[,STEP...]] [--budget SECONDS]
#   bash bench/device_check.sh --cpu-smoke        # same steps, every bench --quick, on CPU (DEVICE_CHECK_CPU_SMOKE=1)
#
# Needs: bash, GNU coreutils `timeout`, and python3 (or $PYTHON) with jax (its CUDA build for the GPU run), flax,
# optax, orbax-checkpoint, absl-py, numpy, scipy. Packages kdjax needs that may be missing (ml-collections,
# tensorflow-datasets, ...) are looked for with `import` first; the missing ones are installed from WHEEL_DIR
# (`pip install --no-index --no-deps --find-links WHEEL_DIR --target build/device_check_pydeps`: no network, no
# change to the system site-packages). kdjax itself is not installed: PYTHONPATH puts this checkout first.
#
# Steps, in priority order, each under its own `timeout` (planned seconds in GPU mode; a step never runs past the
# overall deadline, and is skipped when less than MIN_STEP_S = 20 s remain):
#   kd_r56_r20_b64       kd_step.py resnet56->resnet20, batch 64 float32: single, chunk (K=100), CRD vs KD 100 s
#   kd_vgg13_vgg8_b64    kd_step.py vgg13->vgg8, batch 64 float32: single, chunk, CRD vs KD                   70 s
#   kd_r56_r20_b512_bf16 kd_step.py resnet56->resnet20, batch 512 bfloat16: single, chunk                     75 s
#   tstddev              tstddev.py: nine schemes, resnet56 teacher, 10 epochs of 50,000 images              110 s
#   kd_imagenet          kd_step.py --imagenet: resnet34->resnet18, resnet50->mobilenetv1 (ImageNet zoo),    110 s
#                        224 px, batch 256 bfloat16, chunk K=10
#   augment              augment.py: the nine schemes + base crop+flip, batch 64 and 1024                      45 s
#   forward              forward.py: eval forward of every zoo model, batch 1024 float32                      45 s
#   forward_imagenet     forward.py: eval forward of the ImageNet zoo, 224 px, batch 256 bfloat16             45 s
#   streamed_kd          streamed_kd.py: resnet34->resnet18 ImageNet KD, 224 px b256 bf16, streamed records 150 s
#   kd_distillers        kd_step.py: every distiller's step vs KD, resnet56->resnet20 b64 float32, K=100     150 s
#                        (paired windows; stops starting distillers at its budget: skip rows for the rest)
#   sweep_share          sweep_share.py --procs 1,2,4,8 (N concurrent distill runs)            what is left (<= 400 s)
# Overall deadline 465 s after the start (450 s with --cpu-smoke; DEVICE_CHECK_BUDGET_S or --budget), then the
# summary (at most 10 s): the whole call ends within 8 minutes. A step killed at its budget keeps the rows it had
# printed (summarize.py reads them from its log). --only kd,tstddev runs the steps whose names start so (kd
# includes kd_distillers; --only kd_distillers runs it alone). An argument @STEP_BUDGET@ of a step's command is
# replaced by its time budget less 15 s (kd_step.py --time-budget: it then ends in time and writes its JSON).
#
# Writes bench/results/<bench>_<device kind>_<date>[_quick].json (one per step), and
# bench/results/device_check_<device kind>_<date>[_quick].json (the summary table) plus the directory
# bench/results/device_check_<device kind>_<date>[_quick]/ (one log per step, manifest.tsv, summary.txt). When $OUT
# is set (the device runner's output folder), all of it is copied there as each step ends.
#
# Environment: PYTHON (python3), DEVICE_CHECK_EXTRA_PACKAGES ("module:distribution ..." to check/install too), DEVICE_CHECK_BUDGET_S, DEVICE_CHECK_CPU_SMOKE=1, RESULTS_DIR (bench/results),
# DEVICE_CHECK_DISTILLERS_S (the GPU kd_distillers step's planned seconds, 150),
# CUDA_VISIBLE_DEVICES (0: one GPU, the per-card figure), DEVICE_CHECK_CACHE=0 to switch off the persistent XLA
# compilation cache in build/jax_cache (with it, a rerun on the same machine and the later sweep_share runs compile
# faster; that changes only the reported compile seconds, which are never part of a timed figure).
set -u

CALLER_PWD="$PWD"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
T0=$(date +%s)

usage() { sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

WHEEL_DIR=""
ONLY=""
SMOKE="${DEVICE_CHECK_CPU_SMOKE:-0}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --budget) BUDGET="${2:-}"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -n "$WHEEL_DIR" ]; then echo "one WHEEL_DIR only (got $WHEEL_DIR and $1)" >&2; exit 2; fi
       WHEEL_DIR="$1" ;;
  esac
  shift
done
[ "$SMOKE" = "1" ] || SMOKE=0
case "$WHEEL_DIR" in ""|/*) ;; *) WHEEL_DIR="$CALLER_PWD/$WHEEL_DIR" ;; esac  # relative to the caller
if [ -z "$BUDGET" ]; then
  if [ "$SMOKE" = 1 ]; then BUDGET=450; else BUDGET=465; fi
fi
case "$BUDGET" in ''|*[!0-9]*) echo "--budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
case "${DEVICE_CHECK_DISTILLERS_S:-150}" in
  ''|*[!0-9]*) echo "DEVICE_CHECK_DISTILLERS_S must be whole seconds, got '$DEVICE_CHECK_DISTILLERS_S'" >&2; exit 2 ;;
esac
DEADLINE=$((T0 + BUDGET))
KILL_GRACE=5      # timeout -k: SIGKILL this long after SIGTERM
MIN_STEP_S=20     # a step with less time than this left is skipped

PY="${PYTHON:-python3}"
DEPS_DIR="$REPO/build/device_check_pydeps"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # the package lives in src/ (kdjax/__init__.py there)
[ -d "$DEPS_DIR" ] && export PYTHONPATH="$PYTHONPATH:$DEPS_DIR"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SUFFIX="_quick"
else
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  SUFFIX=""
fi
if [ "${DEVICE_CHECK_CACHE:-1}" != 0 ]; then
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$REPO/build/jax_cache}"
fi

say() { echo "[device_check $(( $(date +%s) - T0 ))s] $*"; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

say "repository $REPO, python $PY, mode $([ "$SMOKE" = 1 ] && echo 'CPU smoke (--quick)' || echo GPU), overall budget ${BUDGET}s"

# --- 1. what kdjax needs: import first, install only the missing ones from WHEEL_DIR --------------------------
# import name:distribution. The first group is needed by the benchmarks; the rest by other kdjax tasks.
NEEDED="jax:jax flax:flax optax:optax orbax.checkpoint:orbax-checkpoint absl:absl-py numpy:numpy scipy:scipy ml_collections:ml-collections"
OPTIONAL="tensorflow_datasets:tensorflow-datasets importlib_resources:importlib_resources PIL:pillow sklearn:scikit-learn matplotlib:matplotlib dm_pix:dm-pix grain:grain array_record:array-record ${DEVICE_CHECK_EXTRA_PACKAGES:-}"
missing_of() {  # prints the distributions of the given import:dist pairs that are not installed (no import run)
  "$PY" - "$@" <<'EOF' 2>/dev/null
import importlib.util, sys
out = []
for pair in sys.argv[1:]:
    mod, dist = pair.split(":", 1)
    try:
        found = importlib.util.find_spec(mod) is not None
    except Exception:
        found = False
    if not found:
        out.append(dist)
print(" ".join(out))
EOF
}
# shellcheck disable=SC2086
MISSING="$(missing_of $NEEDED $OPTIONAL)"
say "missing python packages: ${MISSING:-none}"
if [ -n "$MISSING" ] && [ -n "$WHEEL_DIR" ]; then
  if [ ! -d "$WHEEL_DIR" ]; then
    say "WHEEL_DIR '$WHEEL_DIR' is not a directory: nothing installed"
  else
    mkdir -p "$DEPS_DIR"
    case ":$PYTHONPATH:" in *":$DEPS_DIR:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$DEPS_DIR" ;; esac
    for dist in $MISSING; do  # one at a time: a wheel absent from WHEEL_DIR must not block the others
      cmd=("$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --find-links "$WHEEL_DIR"
           --target "$DEPS_DIR" "$dist")
      show "${cmd[@]}"
      timeout -k 5 60 "${cmd[@]}" || say "pip could not install $dist from $WHEEL_DIR (rc $?)"
    done
    # shellcheck disable=SC2086
    MISSING="$(missing_of $NEEDED $OPTIONAL)"
    say "still missing after installing: ${MISSING:-none}"
  fi
elif [ -n "$MISSING" ]; then
  say "no WHEEL_DIR given: the steps that need $MISSING will fail"
fi

# --- 2. the device, and whether what the benchmarks need really imports -------------------------------------------
if [ "$SMOKE" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
NEEDED_MODULES=""
for pair in $NEEDED; do NEEDED_MODULES="$NEEDED_MODULES ${pair%%:*}"; done
# shellcheck disable=SC2086
PROBE="$(timeout -k 5 120 "$PY" - $NEEDED_MODULES 2>&1 <<'EOF'
import importlib, os, re, sys
bad = []
for mod in sys.argv[1:]:
    try:
        importlib.import_module(mod)
    except Exception as e:
        bad.append(f"{mod} ({type(e).__name__}: {e})")
try:
    import kdjax
    where = os.path.dirname(os.path.dirname(os.path.abspath(kdjax.__file__)))
except Exception as e:
    where = f"'import kdjax' failed: {type(e).__name__}: {e}"
print("IMPORTS|" + ("; ".join(bad) or "ok"))
print("KDJAX|" + where)
import jax
d = jax.devices()[0]
slug = re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-") or "unknown"
print("PROBE", d.platform, slug, jax.__version__, jax.device_count(), d.device_kind, sep="|")
EOF
)"
imports="$(printf '%s\n' "$PROBE" | grep '^IMPORTS|' | tail -1)"
where="$(printf '%s\n' "$PROBE" | grep '^KDJAX|' | tail -1)"
[ "${imports#IMPORTS|}" = ok ] || say "WARNING: the benchmarks need what does not import: ${imports#IMPORTS|}"
[ "${where#KDJAX|}" = "$REPO/src" ] || say "WARNING: kdjax is not this checkout's: ${where#KDJAX|}"
probe_line="$(printf '%s\n' "$PROBE" | grep '^PROBE|' | tail -1)"
if [ -z "$probe_line" ]; then
  printf '%s\n' "$PROBE" | tail -20
  say "FATAL: jax does not start (above); nothing was run"
  exit 2
fi
IFS='|' read -r _ PLATFORM SLUG JAXV NDEV KIND <<<"$probe_line"
say "device: $KIND (platform $PLATFORM, $NDEV visible), jax $JAXV"
if [ "$SMOKE" = 0 ] && [ "$PLATFORM" != gpu ] && [ "${DEVICE_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  say "FATAL: GPU mode but jax runs on '$PLATFORM' (CUDA jax missing?). Use --cpu-smoke on CPU machines."
  exit 2
fi

DATE="$(date +%F)"
RESULTS_DIR="${RESULTS_DIR:-$REPO/bench/results}"
RUN_DIR="$RESULTS_DIR/device_check_${SLUG}_${DATE}${SUFFIX}"
mkdir -p "$RUN_DIR"
MANIFEST="$RUN_DIR/manifest.tsv"
printf 'step\tbench\trc\telapsed_s\ttimeout_s\tplanned_s\tstart_epoch\tjson\tlog\n' >"$MANIFEST"
COPY_TO="${OUT:-}"
copy_out() {  # copy files into the device runner's $OUT, keeping paths relative to the repository
  [ -n "$COPY_TO" ] && [ -d "$COPY_TO" ] || return 0
  local f rel
  for f in "$@"; do
    [ -f "$f" ] || continue
    rel="${f#"$REPO"/}"
    mkdir -p "$COPY_TO/$(dirname "$rel")" && cp -f "$f" "$COPY_TO/$rel"
  done
}
json_for() { echo "$RESULTS_DIR/${1}_${SLUG}_${DATE}${SUFFIX}.json"; }

selected() {
  [ -z "$ONLY" ] && return 0
  local item
  for item in ${ONLY//,/ }; do
    case "$1" in "$item"*) return 0 ;; esac
  done
  return 1
}

FAILED=0
run_step() {  # run_step NAME BENCH PLANNED_S JSON -- command...
  local name=$1 bench=$2 planned=$3 json=$4
  shift 5
  selected "$name" || return 0
  local now left t log start rc elapsed
  now=$(date +%s)
  left=$((DEADLINE - now - KILL_GRACE))
  t=$planned
  [ "$left" -lt "$t" ] && t=$left
  log="$RUN_DIR/$name.log"
  if [ "$t" -lt "$MIN_STEP_S" ]; then
    say "=== $name: SKIPPED, ${left}s left before the deadline (planned ${planned}s)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$bench" skipped 0 "$t" "$planned" "$now" "$json" "$log" \
      >>"$MANIFEST"
    FAILED=$((FAILED + 1))
    return 0
  fi
  say "=== $name: time budget ${t}s (planned ${planned}s; $((DEADLINE - now))s left overall)"
  local a cmd=() inner=$((t > 30 ? t - 15 : t / 2))
  for a in "$@"; do cmd+=("${a//@STEP_BUDGET@/$inner}"); done  # the step's own deadline, inside its timeout
  show "${cmd[@]}" | tee "$log"
  start=$(date +%s)
  timeout -k "$KILL_GRACE" "$t" "${cmd[@]}" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  elapsed=$(( $(date +%s) - start ))
  case "$rc" in
    0) say "=== $name: ok in ${elapsed}s" ;;
    124|137) say "=== $name: TIMED OUT after ${elapsed}s (budget ${t}s, rc $rc)" ;;
    *) say "=== $name: FAILED rc $rc after ${elapsed}s" ;;
  esac
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$bench" "$rc" "$elapsed" "$t" "$planned" "$start" "$json" \
    "$log" >>"$MANIFEST"
  copy_out "$json" "$log" "$MANIFEST"
}

# --- 3. the benchmarks, most important first ----------------------------------------------------------------------
B="$REPO/bench"

# The ImageNet zoo's rows (issue 18): the KD step of the standard ImageNet pairs and the eval forward at 224 px.
# kd_step.py --imagenet times only the chunk driver (K=10, 10-step windows x 3): its steps take tens of ms, so the
# time goes to compiling the two pairs (an estimated 30-40 s each on an H100/H200).
imagenet_steps() {  # imagenet_steps kd|forward (GPU)
  case "$1" in
    kd) run_step kd_imagenet kd_step 110 "$(json_for kd_step-imagenet-b256-bf16)" -- \
          "$PY" "$B/kd_step.py" --imagenet --out "$(json_for kd_step-imagenet-b256-bf16)" ;;
    forward) run_step forward_imagenet forward 45 "$(json_for forward-imagenet)" -- \
          "$PY" "$B/forward.py" --models imagenet --image-size 224 --num-classes 1000 --batch 256 --dtype bfloat16 \
          --out "$(json_for forward-imagenet)" ;;
  esac
}
# CPU smoke: the KD step of one pair that builds both ImageNet families (a ResNet teacher, the MobileNetV1 student)
# at 32 px, one step per dispatch: about 40 CPU-seconds, most of it compiling (2 min 20 s of wall time at load average
# 11 on 2 cores). Its forward is the `forward` step's forward.py code with other model names,
# so the smoke leaves forward_imagenet out; it comes late, so that under load it does not push out the CIFAR rows.
imagenet_step_smoke() {
  run_step kd_imagenet kd_step 120 "$(json_for kd_step-imagenet)" -- \
    "$PY" "$B/kd_step.py" --imagenet --quick --pairs resnet18_imagenet:mobilenetv1_imagenet \
    --out "$(json_for kd_step-imagenet)"
}
# --- streamed ImageNet KD step (bench/streamed_kd.py), one step called in both modes after `forward` --------------
# resnet34_imagenet -> resnet18_imagenet at 224 px, batch 256, bfloat16, fed by the streamed source (grain threads
# decode + RandomResizedCrop synthetic JPEG records on the host) through `kdjax distill`: end-to-end images/s.
# Planned 150 s on the GPU (records ~15 s, compiles ~60-90 s, 32 steps); 120 s in --cpu-smoke (resnet8, 32 px).
# It runs before kd_distillers and sweep_share, which get that much less of the overall budget.
streamed_kd_step() {
  if [ "$SMOKE" = 1 ]; then
    run_step streamed_kd streamed_kd 120 "$(json_for streamed_kd)" -- \
      "$PY" "$B/streamed_kd.py" --quick --out "$(json_for streamed_kd)"
  else
    run_step streamed_kd streamed_kd 150 "$(json_for streamed_kd)" -- \
      "$PY" "$B/streamed_kd.py" --out "$(json_for streamed_kd)"
  fi
}

if [ "$SMOKE" = 1 ]; then
  # Every bench in --quick mode, the same steps as on the GPU. A few size options on top keep the run near 5 minutes
  # on 2 CPU cores: the three KD steps all time the quick case (resnet8->resnet8, batch 16, float32; the first
  # with CRD), so that the second and third find its programs in the compilation cache (bfloat16 on XLA:CPU alone
  # costs ~95 s); 2-step chunks, because XLA:CPU runs convolutions inside a scan very slowly. kd_distillers times
  # two distillers only (dkd, a logit one; fsp: the same program as KD, plus an init stage), ~1 minute, and finds
  # the KD reference in the cache too; `bench/kd_step.py --quick` alone times them all (about 6 minutes).
  KD="--quick --steps 2 --chunk 2 --repeats 1"
  # shellcheck disable=SC2086
  {
  run_step kd_r56_r20_b64 kd_step 120 "$(json_for kd_step-r56-r20-b64-f32)" -- \
    "$PY" "$B/kd_step.py" $KD --distillers crd --out "$(json_for kd_step-r56-r20-b64-f32)"
  run_step kd_vgg13_vgg8_b64 kd_step 60 "$(json_for kd_step-vgg13-vgg8-b64-f32)" -- \
    "$PY" "$B/kd_step.py" $KD --distillers none --out "$(json_for kd_step-vgg13-vgg8-b64-f32)"
  run_step kd_r56_r20_b512_bf16 kd_step 60 "$(json_for kd_step-r56-r20-b512-bf16)" -- \
    "$PY" "$B/kd_step.py" $KD --distillers none --out "$(json_for kd_step-r56-r20-b512-bf16)"
  run_step tstddev tstddev 120 "$(json_for tstddev_quick)" -- \
    "$PY" "$B/tstddev.py" --quick --out "$(json_for tstddev_quick)"
  run_step augment augment 90 "$(json_for augment)" -- \
    "$PY" "$B/augment.py" --quick --batches 64 --out "$(json_for augment)"
  run_step forward forward 60 "$(json_for forward)" -- \
    "$PY" "$B/forward.py" --quick --models resnet8,wrn_16_1 --out "$(json_for forward)"
  streamed_kd_step
  run_step kd_distillers kd_step 75 "$(json_for kd_step-distillers)" -- \
    "$PY" "$B/kd_step.py" --quick --no-kd-drivers --distillers dkd,fsp --distiller-repeats 3 \
    --time-budget @STEP_BUDGET@ --out "$(json_for kd_step-distillers)"
  imagenet_step_smoke
  run_step sweep_share sweep_share 120 "$(json_for sweep_share)" -- \
    "$PY" "$B/sweep_share.py" --quick --out "$(json_for sweep_share)"
  }
else
  # The README's KD step rows (bench/NOTES.md targets 22,700 / 70,000 / 70,000 img/s), each pair in its own process
  # so that one slow compile cannot take the others with it; CRD against KD (paired windows) is timed with the
  # batch-64 cases.
  run_step kd_r56_r20_b64 kd_step 100 "$(json_for kd_step-r56-r20-b64-f32)" -- \
    "$PY" "$B/kd_step.py" --pairs resnet56:resnet20 --settings 64:float32 --distillers crd \
    --out "$(json_for kd_step-r56-r20-b64-f32)"
  run_step kd_vgg13_vgg8_b64 kd_step 70 "$(json_for kd_step-vgg13-vgg8-b64-f32)" -- \
    "$PY" "$B/kd_step.py" --pairs vgg13:vgg8 --settings 64:float32 --distillers crd \
    --out "$(json_for kd_step-vgg13-vgg8-b64-f32)"
  # 512 x K=100 steps per chunk needs 51,200 training rows (kd_step.py refuses 50,000 at batch 512); 300-step
  # windows keep the 3 timed windows x 2 drivers of this slower case inside its budget.
  run_step kd_r56_r20_b512_bf16 kd_step 75 "$(json_for kd_step-r56-r20-b512-bf16)" -- \
    "$PY" "$B/kd_step.py" --pairs resnet56:resnet20 --settings 512:bfloat16 --distillers none --num-train 51200 \
    --steps 300 --out "$(json_for kd_step-r56-r20-b512-bf16)"
  run_step tstddev tstddev 110 "$(json_for tstddev_full)" -- \
    "$PY" "$B/tstddev.py" --out "$(json_for tstddev_full)"
  imagenet_steps kd
  run_step augment augment 45 "$(json_for augment)" -- \
    "$PY" "$B/augment.py" --out "$(json_for augment)"
  run_step forward forward 45 "$(json_for forward)" -- \
    "$PY" "$B/forward.py" --out "$(json_for forward)"
  imagenet_steps forward
  streamed_kd_step
  # Every distiller's step cost relative to KD (kd_step.py --distillers all: 17 distillers and the init stages of
  # ab, ft, fsp, 20 rows) on the batch-64 pair of the first step, whose KD and CRD programs it finds in the
  # compilation cache; ab and fsp reuse KD's program. Compile-bound (17 new programs, an estimated 10-30 s each on
  # an H100/H200): 4 compiled at a time, 100-step windows, and its own deadline (--time-budget) so that it stops
  # starting distillers in time; the ones not reached get skip rows, in the priority order of kd_step.py. For all
  # of them: DEVICE_CHECK_DISTILLERS_S=400 bash bench/device_check.sh --only kd_distillers.
  run_step kd_distillers kd_step "${DEVICE_CHECK_DISTILLERS_S:-150}" "$(json_for kd_step-distillers-r56-r20-b64-f32)" -- \
    "$PY" "$B/kd_step.py" --pairs resnet56:resnet20 --settings 64:float32 --no-kd-drivers --distillers all \
    --distiller-steps 100 --compile-workers 4 --time-budget @STEP_BUDGET@ \
    --out "$(json_for kd_step-distillers-r56-r20-b64-f32)"
  # Last and with whatever time is left: its rounds print as they finish, so a timeout still leaves the first ones.
  # The parent process must not preallocate GPU memory that its child runs need.
  run_step sweep_share sweep_share 400 "$(json_for sweep_share)" -- \
    env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" "$B/sweep_share.py" --procs 1,2,4,8 --out "$(json_for sweep_share)"
fi

# --- 4. the summary -----------------------------------------------------------------------------------------------
SUMMARY_JSON="$(json_for device_check)"
say "all steps done ($FAILED failed or skipped); summary:"
cmd=("$PY" "$B/summarize.py" --manifest "$MANIFEST" --out "$SUMMARY_JSON")
show "${cmd[@]}"
timeout -k 2 10 "${cmd[@]}" 2>&1 | tee "$RUN_DIR/summary.txt"  # stdlib only: well under a second
copy_out "$SUMMARY_JSON" "$RUN_DIR/summary.txt" "$MANIFEST"
say "finished in $(( $(date +%s) - T0 ))s (budget ${BUDGET}s)"
[ "$FAILED" = 0 ]

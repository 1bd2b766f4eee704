#!/usr/bin/env bash
# fastdm GPU check: ONE prepared call on a bare CUDA machine (no network), most valuable figures first.
#
#   tools/gpu_check.sh --fetch-wheels     # here, with network: the wheel the GPU machine lacks -> wheels/
#   tools/gpu_check.sh --dry-run          # the plan, each step's timeout, the payload, what to carry, the time
#                                         # limit to ask for; runs nothing; exits 1 when something needed is missing
#   tools/gpu_check.sh                    # on the GPU machine (carry wheels/): every step below, <= BUDGET s
#
# The target machine: Python 3.12, torch 2.11 (CUDA 13), Triton 3.6, CPU onnxruntime, transformers,
# huggingface_hub, safetensors, accelerate, imageio, setuptools, pytest, pytest-xdist; no diffusers, no
# TensorRT, no network. diffusers travels as a wheel (WHEELS below; --no-deps: everything it needs on
# Python 3.12 is there). fastdm itself is always installed (editable, no deps, no index; a copy on
# PYTHONPATH when pip cannot), so the kernel steps run even without the wheel.
#
# Steps, in priority order. A step gets at most its own timeout, and never more than what is left of the
# budget minus the reserve kept for the last step. The steps before bench-compile-16 fit the budget even
# if every one of them runs to its timeout; later steps get what is left.
#   env              nvidia-smi, versions of Python, torch/CUDA, Triton, onnxruntime (+ providers)
#   install          fastdm (editable, no deps) + the carried wheel(s)
#   versions         the same after the install, GPU name and capability
#   kernel-tests     tests/test_kernels.py on the compiled kernels, full ZeroScope key sizes (-n 4 with xdist, -rA)
#   bench-ssm        benchmarks.bench_ssm --device cuda --quick: materialized vs torch vs Triton (its configs, and
#                    autotuned over launch.AUTOTUNE_CONFIGS with the choice recorded), roofline fractions
#   bench-16         fastdm-bench zeroscope-576w bf16, 16 frames: fast, lean, plain; each with one extra step under
#                    the CUDA profiler (device time by kind of kernel, the top kernels)
#   bench-24         the same at 24 frames
#   bench-compile-16 fast:compile at 16 frames, the no-grad evaluations compiled (it gets what is left; the first
#                    run's fast:compile+grad printed nothing in 150 s; on the shapes model the no-grad engine alone
#                    builds in 55 % of the time: benchmarks/results/compile-build-shapes-cpu-amd-epyc-2core-x86_64.md)
#   bench-naive-16   naive at 16 frames (projected 74.9 GiB; at 24 frames 110 GiB, not run)
#   memory-compare   the CPU projection (benchmarks/results/memory-projection-*.json) against the measured peaks
# Every benchmark writes its JSON/markdown after each finished case, so a step cut by its timeout keeps its
# finished rows; the summary pastes every table that exists, partial ones included.
#
# Results: everything under ${OUT:-gpu-results}: summary.md (steps, status, seconds; then every table),
# gpu-check.log, details.tar.gz (every step's log and results); without $OUT the details folder stays there
# unpacked as well.
set -u

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS_DIR=${FASTDM_WHEELS:-wheels}
WHEELS=("diffusers==0.42.1")
BUDGET=${GPU_CHECK_BUDGET:-540}
RESERVE=${GPU_CHECK_RESERVE:-20}     # kept for memory-compare (the last step) and packing
MIN_STEP=${GPU_CHECK_MIN_STEP:-15}   # a step with less time left than this is skipped
MARGIN=30                            # the device call's limit above the budget: start-up of the shell, packing
PY=${PYTHON:-python3}
PAYLOAD_LIMIT=$((64 * 1024 * 1024))
PROJECTION=benchmarks/results/memory-projection-cuda-bf16.json
BENCH="-m fastdm.bench.harness --preset zeroscope-576w --device cuda --dtype bf16 --steps 3 --no-flops"
ENVFILE='[ -f "$WORK/.env" ] && . "$WORK/.env";'   # what the install step found (PYTHONPATH of the fallback)

# name | timeout s | needs (- or diffusers) | command (run by bash -c)
STEPS=(
  "env|20|-|nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; $PY -V; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available()); print(\"triton\", triton.__version__)'; $PY -c 'import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())'; $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|huggingface|safetensors|onnx|numpy|diffusers|tensorrt|xformers|pytest-xdist|setuptools) '"
  "install|60|-|$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo 'pip could not install fastdm: a copy on PYTHONPATH instead'; rm -rf \$WORK/site; mkdir -p \$WORK/site && cp -rL fastdm \$WORK/site/ && echo \"export PYTHONPATH=\$WORK/site\" >\$WORK/.env; }; if ls $WHEELS_DIR/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps --find-links $WHEELS_DIR $WHEELS_DIR/*.whl; else echo 'no wheels in $WHEELS_DIR/: the steps that need diffusers are skipped (run tools/gpu_check.sh --fetch-wheels and carry $WHEELS_DIR)'; fi; $ENVFILE $PY -c 'import fastdm.kernels' || exit 1; $PY -c 'import diffusers' 2>/dev/null && touch \$WORK/.diffusers; $PY -m pip show diffusers fastdm 2>/dev/null | grep -E '^(Name|Version|Location)'; exit 0"
  "versions|20|-|$ENVFILE $PY -c 'import torch, transformers, fastdm, fastdm.kernels; i = torch.cuda.current_device(); print(\"transformers\", transformers.__version__); print(torch.cuda.get_device_name(i), \"sm%d%d\" % torch.cuda.get_device_capability(i), round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1), \"GiB\")'; $PY -c 'import diffusers; print(\"diffusers\", diffusers.__version__)'"
  "kernel-tests|120|-|$ENVFILE X=; $PY -c 'import xdist' 2>/dev/null && X='-n 4'; TRITON_INTERPRET=0 $PY -m pytest -q -rA -p no:cacheprovider \$X tests/test_kernels.py"
  "bench-ssm|80|-|$ENVFILE $PY -m benchmarks.bench_ssm --device cuda --quick --repeats 3 --backends naive,torch,triton,triton-autotune --out \$WORK"
  "bench-16|120|diffusers|$ENVFILE $PY $BENCH --frames 16 --modes fast,lean,plain --cuda-profile --out \$WORK/bench-16"
  "bench-24|100|diffusers|$ENVFILE $PY $BENCH --frames 24 --modes fast,lean,plain --out \$WORK/bench-24"
  "bench-compile-16|150|diffusers|$ENVFILE $PY $BENCH --frames 16 --modes fast:compile --out \$WORK/bench-compile-16"
  "bench-naive-16|60|diffusers|$ENVFILE $PY $BENCH --frames 16 --modes naive --out \$WORK/bench-naive-16"
  "memory-compare|$RESERVE|-|$ENVFILE $PY -m benchmarks.project_memory --projection $PROJECTION --measured \$WORK/bench-*/edit-*.json --out \$WORK --machine gpu-check"
)
# the last step that must fit the budget even when every step before it runs to its timeout
PRIORITY_LAST=bench-24
SKIPPED=(
  "bench fast:trt|TensorRT is not on the machine and its wheels (tensorrt-cu13 + libs) are far above the 64 MiB a call carries: TensorRT unverified"
  "bench fast:ort on cuda|only the CPU onnxruntime is there (onnxruntime-gpu not carried); fastdm refuses ort on a CUDA model without it: ort-on-CUDA unverified"
  "bench naive at 24 frames|projected at 110 GiB (benchmarks/results/memory-projection-cuda-bf16.md): the least valuable mode and the slowest; its 16-frame row is run last instead"
)
# files of the working tree the check does not read (counted apart in the payload)
UNUSED=(tools/checkpoints docs "benchmarks/results/*.png" fastdm/assets/models/shapes-upscale fastdm/assets/models/shapes-dit)

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

fetch_wheels() {
  mkdir -p "$WHEELS_DIR"
  $PY -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d "$WHEELS_DIR" "${WHEELS[@]}" || return 1
  du -ch "$WHEELS_DIR"/*.whl | tail -1
}

bytes_of() {  # bytes of the tracked + untracked-not-ignored files under the given paths (all when none)
  git ls-files -co --exclude-standard -z -- "$@" 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1
}

payload_bytes() {  # what a device call sends: tracked + untracked-not-ignored files, plus the carried wheels
  local tree wheels=0 unused
  tree=$(bytes_of)
  unused=$(bytes_of "${UNUSED[@]}")
  [ -d "$WHEELS_DIR" ] && wheels=$(du -cb "$WHEELS_DIR" | tail -1 | cut -f1)
  echo "$((${tree:-0} + wheels)) ${tree:-0} $wheels ${unused:-0}"
}

missing_wheels() {
  local w n v
  for w in "${WHEELS[@]}"; do
    n=${w%%==*}; v=${w##*==}
    ls "$WHEELS_DIR"/"${n//-/_}"-"$v"-*.whl >/dev/null 2>&1 || ls "$WHEELS_DIR"/"$n"-"$v"-*.whl >/dev/null 2>&1 || echo "$w"
  done
}

DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) fetch_wheels; exit $? ;;
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (try --dry-run or --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${OUT:-}" ]; then RES=$OUT; WORK=${TMPDIR:-/tmp}/fastdm-gpu-check/details; else RES=$ROOT/gpu-results; WORK=$RES/details; fi
export WORK
SUMMARY=$RES/summary.md
LOG=$RES/gpu-check.log
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  problems=0
  read -r total tree wheels unused <<<"$(payload_bytes)"
  echo "fastdm GPU check: plan (dry run; nothing is run). Budget ${BUDGET}s, reserve ${RESERVE}s for the last step."
  echo "results: ${OUT:-gpu-results} (summary.md, gpu-check.log, details.tar.gz)"
  t=0
  i=0
  n=${#STEPS[@]}
  for s in "${STEPS[@]}"; do
    i=$((i + 1))
    IFS='|' read -r name to needs cmd <<<"$s"
    left=$((BUDGET - t)); [ "$i" -lt "$n" ] && left=$((left - RESERVE))
    if [ "$left" -lt "$MIN_STEP" ]; then worst="skipped if every earlier step ran to its timeout"; to=0
    elif [ "$to" -gt "$left" ]; then worst="cut to ${left}s if every earlier step ran to its timeout"; to=$left
    else worst="fits"; fi
    t=$((t + to))
    echo "step $name (timeout ${to}s, needs $needs, by ${t}s, worst case: $worst): $cmd"
    if [ "$name" = "$PRIORITY_LAST" ]; then
      echo "priority: the steps up to $name take at most ${t}s + ${RESERVE}s reserve of the ${BUDGET}s budget"
      [ $((t + RESERVE)) -gt "$BUDGET" ] && { echo "priority: OVER the budget"; problems=1; }
    fi
  done
  for s in "${SKIPPED[@]}"; do IFS='|' read -r name why <<<"$s"; echo "skip $name: $why"; done
  mapfile -t missing < <(missing_wheels)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "wheels: MISSING ${missing[*]} in $WHEELS_DIR/: run tools/gpu_check.sh --fetch-wheels (the benchmark steps need diffusers)"
    problems=1
  else
    echo "wheels: all ${#WHEELS[@]} in $WHEELS_DIR/"
  fi
  echo "payload: $((total / 1048576)) MiB (working tree $((tree / 1048576)) MiB, of which $((unused / 1048576)) MiB the check does not read (${UNUSED[*]}); wheels $((wheels / 1048576)) MiB) of $((PAYLOAD_LIMIT / 1048576)) MiB"
  if [ "$total" -gt "$PAYLOAD_LIMIT" ]; then echo "payload: OVER the limit: ignore or remove large untracked files before the device call"; problems=1; fi
  echo "device call: command 'bash tools/gpu_check.sh', carry [\"$WHEELS_DIR\"], timeout_s $((BUDGET + MARGIN))"
  exit $problems
fi

mkdir -p "$RES" "$WORK"
touch "$WORK/.start"
: >"$LOG"
{
  echo "# fastdm GPU check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo
  echo "| step | status | seconds | timeout s |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

pack() { tar czf "$RES/details.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null || true; }

n=${#STEPS[@]}
i=0
for s in "${STEPS[@]}"; do
  i=$((i + 1))
  IFS='|' read -r name to needs cmd <<<"$s"
  if [ "$needs" = diffusers ] && [ ! -f "$WORK/.diffusers" ]; then
    echo "| $name | skipped: no diffusers (wheels not carried or not installed) | 0 | $to |" >>"$SUMMARY"
    echo "== $name: skipped, no diffusers" | tee -a "$LOG"
    continue
  fi
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$i" -lt "$n" ] && left=$((left - RESERVE))
  if [ "$left" -lt "$MIN_STEP" ]; then
    echo "| $name | skipped: out of time (${left}s left) | 0 | $to |" >>"$SUMMARY"
    echo "== $name: skipped, out of time" | tee -a "$LOG"
    continue
  fi
  [ "$to" -gt "$left" ] && to=$left
  echo "== $name (timeout ${to}s)" | tee -a "$LOG"
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 timeout --kill-after=5 "$to" bash -c "$cmd" >"$WORK/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  case $rc in
    0) st=ok ;;
    124|137) st="TIMED OUT (finished rows kept)" ;;
    *) st="failed (exit $rc)" ;;
  esac
  tail -n 40 "$WORK/$name.log" >>"$LOG"
  echo "| $name | $st | $dt | $to |" >>"$SUMMARY"
  echo "== $name: $st in ${dt}s" | tee -a "$LOG"
  pack
done
{
  echo
  echo "Skipped:"
  for s in "${SKIPPED[@]}"; do IFS='|' read -r name why <<<"$s"; echo "- $name: $why"; done
  if [ -f "$WORK/kernel-tests.log" ]; then
    echo
    echo "## kernel-tests"
    echo
    echo "$(grep -c '^PASSED' "$WORK/kernel-tests.log") passed, $(grep -c '^FAILED' "$WORK/kernel-tests.log") failed, $(grep -c '^SKIPPED' "$WORK/kernel-tests.log") skipped (by -rA lines)"
    grep -E '^(FAILED|ERROR)' "$WORK/kernel-tests.log" | head -20 | sed 's/^/    /'
    tail -n 1 "$WORK/kernel-tests.log" | sed 's/^/    /'
  fi
  for f in "$WORK"/ssm-*.md "$WORK"/bench-*/edit-*.md "$WORK"/memory-projection-gpu-check.md; do
    [ -f "$f" ] && { echo; echo "## $(basename "$(dirname "$f")")/$(basename "$f")"; echo; cat "$f"; }
  done
  echo
  echo "Total $(($(date +%s) - START))s."
} >>"$SUMMARY"
pack
cat "$SUMMARY"

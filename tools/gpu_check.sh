#!/usr/bin/env bash
# fastdm GPU check: one prepared run on a bare CUDA machine (no network), within a time budget.
#
#   tools/gpu_check.sh --fetch-wheels     # here, with network: the wheels the GPU machine lacks -> wheels/
#   tools/gpu_check.sh --dry-run          # the plan, the budget per step and the payload size; runs nothing
#   tools/gpu_check.sh                    # on the GPU machine (carry wheels/): everything below, <= BUDGET s
#   tools/gpu_check.sh --only bench-compile-16,bench-compile-24 --budget 480   # a second call for the rest
#
# The target machine: Python 3.12, torch 2.11 (CUDA 13), Triton 3.6, CPU onnxruntime, transformers,
# huggingface_hub, safetensors; no diffusers, no TensorRT, no onnxruntime-gpu, no network. The missing
# pure-Python packages travel as wheels (WHEELS below) and are installed with --no-index.
#
# Steps, in priority order (a step gets at most its own timeout, and never more than what is left of
# the budget minus the reserve kept for the last step, so one hang cannot eat the run):
#   env              nvidia-smi, versions of Python, torch/CUDA, Triton, onnxruntime (+ providers)
#   install          the carried wheels + fastdm itself (editable, no deps, no index)
#   versions         the same after the install (diffusers, transformers), GPU name and capability
#   kernel-tests     python -m pytest -q tests/test_kernels.py with TRITON_INTERPRET=0 (real Triton on the GPU)
#   bench-ssm        python -m benchmarks.bench_ssm --device cuda --quick --repeats 1
#   bench-eager-24   fastdm-bench zeroscope-576w, 24 frames, bf16: naive, plain, fast, lean
#   bench-eager-16   the same at 16 frames
#   bench-compile-16 fast:compile+grad, fast:cudagraphs+grad at 16 frames (ZeroScope compiles take minutes)
#   bench-compile-24 the same at 24 frames
#   memory-compare   the CPU projection (benchmarks/results/memory-projection-*.json) against the measured peaks
# Skipped, with the reason in the summary: fast:trt (TensorRT wheels are far larger than the 64 MiB a
# call may carry), fast:ort on CUDA (only the CPU onnxruntime is there; fastdm refuses it on CUDA by design).
#
# Results: everything under ${OUT:-gpu-results}: summary.md (a table of steps, status, seconds),
# gpu-check.log, details.tar.gz (every step's log, the benchmark JSON/markdown); without $OUT the
# details folder stays there unpacked as well.
set -u

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS_DIR=${FASTDM_WHEELS:-wheels}
WHEELS=("diffusers==0.42.1" "importlib_metadata==10.2.0")
BUDGET=${GPU_CHECK_BUDGET:-470}
RESERVE=${GPU_CHECK_RESERVE:-30}     # kept for memory-compare (the last step) and packing
MIN_STEP=${GPU_CHECK_MIN_STEP:-15}   # a step with less time left than this is skipped
PY=${PYTHON:-python3}
PAYLOAD_LIMIT=$((64 * 1024 * 1024))
PROJECTION=benchmarks/results/memory-projection-cpu-2core-x86_64.json
BENCH=(-m fastdm.bench.harness --preset zeroscope-576w --device cuda --dtype bf16 --steps 2)

# name | timeout s | command (run by bash -c)
STEPS=(
  "env|30|nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv; $PY -V; $PY -c 'import torch, triton, onnxruntime as o; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available()); print(\"triton\", triton.__version__); print(\"onnxruntime\", o.__version__, o.get_available_providers())'; $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|huggingface|safetensors|onnx|numpy|diffusers|tensorrt|xformers) '"
  "install|90|ls $WHEELS_DIR/*.whl >/dev/null 2>&1 || { echo 'no wheels: run tools/gpu_check.sh --fetch-wheels where pip reaches PyPI, and carry $WHEELS_DIR'; exit 3; }; $PY -m pip install -q --no-index --no-deps --find-links $WHEELS_DIR $WHEELS_DIR/*.whl && $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . && $PY -m pip show diffusers importlib_metadata fastdm | grep -E '^(Name|Version|Location)'"
  "versions|30|$PY -c 'import torch, diffusers, transformers, fastdm, fastdm.kernels; print(\"diffusers\", diffusers.__version__, \"transformers\", transformers.__version__); i = torch.cuda.current_device(); print(torch.cuda.get_device_name(i), \"sm%d%d\" % torch.cuda.get_device_capability(i), round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1), \"GiB\")'"
  "kernel-tests|90|TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py"
  "bench-ssm|45|$PY -m benchmarks.bench_ssm --device cuda --quick --repeats 1; rc=\$?; find benchmarks/results -maxdepth 1 -name 'ssm-*' -newer \$WORK/.start -exec cp {} \$WORK/ \\; ; exit \$rc"
  "bench-eager-24|180|$PY ${BENCH[*]} --frames 24 --modes naive,plain,fast,lean --out \$WORK/bench-eager-24"
  "bench-eager-16|180|$PY ${BENCH[*]} --frames 16 --modes naive,plain,fast,lean --out \$WORK/bench-eager-16"
  "bench-compile-16|240|$PY ${BENCH[*]} --frames 16 --modes fast:compile+grad,fast:cudagraphs+grad --out \$WORK/bench-compile-16"
  "bench-compile-24|240|$PY ${BENCH[*]} --frames 24 --modes fast:compile+grad,fast:cudagraphs+grad --out \$WORK/bench-compile-24"
  "memory-compare|$RESERVE|$PY -m benchmarks.project_memory --projection $PROJECTION --measured \$WORK/*.log \$WORK/bench-*/edit-*.json --out \$WORK --machine gpu-check"
)
SKIPPED=(
  "bench fast:trt|TensorRT is not on the machine and its wheels (tensorrt-cu13 + libs) are far above the 64 MiB a call carries: TensorRT unverified"
  "bench fast:ort on cuda|only the CPU onnxruntime is there (onnxruntime-gpu not carried); fastdm refuses ort on a CUDA model without it: ort-on-CUDA unverified"
)

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

fetch_wheels() {
  mkdir -p "$WHEELS_DIR"
  $PY -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d "$WHEELS_DIR" "${WHEELS[@]}" || return 1
  du -ch "$WHEELS_DIR"/*.whl | tail -1
}

payload_bytes() {  # what a device call sends: tracked + untracked-not-ignored files, plus the carried wheels
  local tree wheels=0
  tree=$(git ls-files -co --exclude-standard -z 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  [ -d "$WHEELS_DIR" ] && wheels=$(du -cb "$WHEELS_DIR" | tail -1 | cut -f1)
  echo "$((${tree:-0} + wheels)) ${tree:-0} $wheels"
}

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) fetch_wheels; exit $? ;;
    --dry-run) DRY=1 ;;
    --only) ONLY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${OUT:-}" ]; then RES=$OUT; WORK=${TMPDIR:-/tmp}/fastdm-gpu-check/details; else RES=$ROOT/gpu-results; WORK=$RES/details; fi
export WORK
SUMMARY=$RES/summary.md
LOG=$RES/gpu-check.log
START=$(date +%s)

selected() {  # is step $1 selected by --only (install/env/versions always run unless --only names steps only)
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  case "$1" in env|install|versions) return 0 ;; esac
  return 1
}

if [ "$DRY" = 1 ]; then
  read -r total tree wheels <<<"$(payload_bytes)"
  echo "fastdm GPU check: plan (dry run; nothing is run). Budget ${BUDGET}s, reserve ${RESERVE}s for the last step."
  echo "results: ${OUT:-gpu-results} (summary.md, gpu-check.log, details.tar.gz)"
  t=0
  i=0
  for s in "${STEPS[@]}"; do
    i=$((i + 1))
    IFS='|' read -r name to cmd <<<"$s"
    if selected "$name"; then
      left=$((BUDGET - t)); [ "$i" -lt "${#STEPS[@]}" ] && left=$((left - RESERVE))
      if [ "$left" -lt "$MIN_STEP" ]; then worst="skipped if every earlier step ran to its timeout"; to=0
      elif [ "$to" -gt "$left" ]; then worst="cut to ${left}s if every earlier step ran to its timeout"; to=$left
      else worst="fits"; fi
      t=$((t + to)); echo "step $name (timeout ${to}s, worst case: $worst): $cmd"
    else
      echo "step $name: not selected (--only)"
    fi
  done
  for s in "${SKIPPED[@]}"; do IFS='|' read -r name why <<<"$s"; echo "skip $name: $why"; done
  [ "$t" -gt "$BUDGET" ] && echo "note: the timeouts add up to ${t}s > budget ${BUDGET}s: late steps get what is left, or are skipped (out of time)"
  missing=()
  for w in "${WHEELS[@]}"; do
    n=${w%%==*}; v=${w##*==}
    ls "$WHEELS_DIR"/"${n//-/_}"-"$v"-*.whl >/dev/null 2>&1 || ls "$WHEELS_DIR"/"$n"-"$v"-*.whl >/dev/null 2>&1 || missing+=("$w")
  done
  if [ ${#missing[@]} -gt 0 ]; then echo "wheels: missing ${missing[*]} in $WHEELS_DIR/ (run tools/gpu_check.sh --fetch-wheels)"; else echo "wheels: all ${#WHEELS[@]} in $WHEELS_DIR/"; fi
  echo "payload: $((total / 1048576)) MiB (working tree $((tree / 1048576)) MiB + wheels $((wheels / 1048576)) MiB) of $((PAYLOAD_LIMIT / 1048576)) MiB"
  if [ "$total" -gt "$PAYLOAD_LIMIT" ]; then echo "payload: OVER the limit: ignore or remove large untracked files before the device call"; exit 1; fi
  exit 0
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
  IFS='|' read -r name to cmd <<<"$s"
  selected "$name" || continue
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
  PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 timeout --kill-after=10 "$to" bash -c "$cmd" >"$WORK/$name.log" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  case $rc in
    0) st=ok ;;
    124|137) st="TIMED OUT (partial results in its log)" ;;
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
  for f in "$WORK"/memory-projection-gpu-check.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
  for f in "$WORK"/bench-*/edit-*.md; do [ -f "$f" ] && { echo; echo "## $(basename "$(dirname "$f")")"; cat "$f"; }; done
  echo
  echo "Total $(($(date +%s) - START))s."
} >>"$SUMMARY"
pack
cat "$SUMMARY"

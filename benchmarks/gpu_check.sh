#!/usr/bin/env bash
# The GPU checks in one go, on one H100 / H200 in at most ~8 minutes (GPU_CHECK_BUDGET_S). Each
# part runs under `timeout` and writes its own JSON, so a part that fails or runs out of time
# keeps the others; every JSON names the card (dlip.fileio.machine()). Weights are random
# presets (speed depends on shapes, not values): nothing is downloaded.
#   part           JSON                    what                                        box
#   train_eager    gpu_train_eager.json    blip_base -> dlip_small distillation step,  120 s
#                                          bf16, batch 64 and 256, with and without the
#                                          teacher: s/step, samples/s, teacher share,
#                                          FLOPs, MFU, peak memory
#   latency        latency_cuda.json       `dlip bench latency --device cuda`, 4 presets 90 s
#   itm            gpu_itm.json            ITM re-rank pairs/s, blip_base, dlip_small   60 s
#   train_compile  gpu_train_compile.json  train_eager at batch 64 with run.compile    the rest
#   (summary)      gpu_check.json          each part's status and seconds, nvidia-smi   30 s
# The log of everything is gpu_check.log beside them. Parts run in that order (compile last:
# it is the slowest and least sure); a part gets min(its box, what is left of the budget).
#
#   bash benchmarks/gpu_check.sh                # -> benchmarks/results/
#   RESULTS=/some/dir bash benchmarks/gpu_check.sh
# then, with the JSON in benchmarks/results/: python benchmarks/report.py (renders the doc).
# Env: RESULTS (output dir), PYTHON (interpreter to try first), GPU_CHECK_BUDGET_S (default
# 480), GPU_CHECK_PARTS (names of the parts to run, e.g. "train_compile" to redo one; default
# all), GPU_CHECK_SMOKE=1 (CPU, tiny preset, seconds: the test suite's run of this script).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "${RESULTS:=$ROOT/benchmarks/results}"
RESULTS=$(cd "$RESULTS" && pwd)
cd "$ROOT"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
SMOKE=${GPU_CHECK_SMOKE:-0}
ONLY=${GPU_CHECK_PARTS:-train_eager latency itm train_compile}
RESERVE=45 # seconds kept back for a killed part's grace (15) and the summary
LOG=$RESULTS/gpu_check.log
PARTS=$(mktemp)
trap 'rm -f "$PARTS"' EXIT
: >"$LOG"
# dlip from this checkout whether installed or not; unbuffered, so a killed part's log is whole
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

log() { echo "$*" | tee -a "$LOG"; }

# ------------------------------------------------ an interpreter: torch that sees the GPU + deps
NEED='import torch; assert torch.cuda.is_available(), "torch sees no GPU"'
if [[ $SMOKE == 1 ]]; then NEED='import torch'; fi
NEED="$NEED; import torchvision, timm, tokenizers, safetensors, numpy, PIL, tqdm, yaml"
usable() { command -v "$1" >/dev/null 2>&1 && "$1" -c "$NEED" >/dev/null 2>&1; }
PY=
for cand in ${PYTHON:-} .venv/bin/python python3 python; do
  if usable "$cand"; then
    PY=$cand
    break
  fi
done
if [[ -z $PY ]]; then # install, as the Makefile does; the box's own CUDA torch if it has one
  if [[ ! -e .venv ]] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null
  then
    log "gpu_check: installing dlip into .venv beside the box's torch"
    python3 -m venv --system-site-packages .venv
    timeout 300 .venv/bin/pip install -e . 2>&1 | tee -a "$LOG" || true
  else
    log "gpu_check: installing with make .venv/.dev-installed"
    timeout 600 make .venv/.dev-installed 2>&1 | tee -a "$LOG" || true
  fi
  PY=.venv/bin/python
  usable "$PY" || { log "gpu_check: no Python with CUDA torch and dlip's dependencies"; exit 1; }
fi
log "gpu_check: $PY; results in $RESULTS; budget ${BUDGET}s, ${SECONDS}s spent on setup"

# ---------------------------------------------------------------------------------- the parts
FAILED=0
part() { # part NAME BOX_S JSON CMD...: CMD under `timeout`; a failure is recorded, not fatal
  local name=$1 box=$2 json=$3 rc=0 t0=$SECONDS left
  shift 3
  [[ " $ONLY " == *" $name "* ]] || return 0
  rm -f "$RESULTS/$json" # an older run's record must not pass for this run's
  left=$((BUDGET - SECONDS - RESERVE))
  ((box <= left)) || box=$left
  if ((box < 20)); then
    log "== $name: skipped, ${left}s of the budget left"
    printf '%s\t%s\tskip\t0\t%s\n' "$name" "$json" "$box" >>"$PARTS"
    FAILED=$((FAILED + 1))
    return 0
  fi
  log "== $name (time box ${box}s): $*"
  timeout -k 15 "$box" "$@" 2>&1 | tee -a "$LOG" || rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$json" "$rc" "$((SECONDS - t0))" "$box" >>"$PARTS"
  log "== $name: exit $rc after $((SECONDS - t0))s"
  ((rc == 0)) || FAILED=$((FAILED + 1))
}

if [[ $SMOKE == 1 ]]; then
  DEV=cpu
  TRAIN=(--device cpu --recipe configs/pretrain/tiny_synth.yaml --teacher test_tiny
    --image-size 32 --batch-sizes 4 --warmup 1 --steps 1 --peak-flops 1e12)
  COMPILE=(--compile --compile-backend eager)
  LATENCY=(--device cpu --threads 1 --models test_tiny --teacher test_tiny --image-size 32
    --warmup 0 --repeats 1)
  ITM=(--device cpu --presets test_tiny --image-size 32 --images 4 --texts 12 --k 3
    --itm-batches 8 --repeats 1)
else # gpu_bench.py's defaults are the GPU settings
  DEV=cuda
  TRAIN=(--device cuda)
  COMPILE=(--compile --batch-sizes 64)
  LATENCY=(--device cuda --warmup 3 --repeats 20) # 20 of each row's calls: fits the box
  ITM=(--device cuda)
fi
BENCH=("$PY" benchmarks/gpu_bench.py)
part train_eager 120 gpu_train_eager.json \
  "${BENCH[@]}" train "${TRAIN[@]}" --out "$RESULTS/gpu_train_eager.json"
part latency 90 "latency_$DEV.json" \
  "$PY" -m dlip bench latency "${LATENCY[@]}" --out-dir "$RESULTS"
part itm 60 gpu_itm.json "${BENCH[@]}" itm "${ITM[@]}" --out "$RESULTS/gpu_itm.json"
part train_compile 600 gpu_train_compile.json \
  "${BENCH[@]}" train "${TRAIN[@]}" "${COMPILE[@]}" --out "$RESULTS/gpu_train_compile.json"

log "== summary"
timeout 30 "${BENCH[@]}" summary --parts "$PARTS" --results "$RESULTS" --budget "$BUDGET" \
  --elapsed "$SECONDS" --out "$RESULTS/gpu_check.json" 2>&1 | tee -a "$LOG" ||
  log "gpu_check: the summary failed"
log "gpu_check: ${SECONDS}s in all, $FAILED part(s) not ok"
((FAILED == 0))

#!/usr/bin/env bash
# Everything a session with a GPU owes, in stages that each fit one 10-minute device call:
#
#   bash bench/gpu_session.sh build       # CUDA build of the extension + `fastattn info`
#   bash bench/gpu_session.sh test        # the GPU tests (fused backends vs the reference on CUDA)
#   bash bench/gpu_session.sh sanitize    # compute-sanitizer memcheck on small fwd+bwd runs
#   bash bench/gpu_session.sh attn        # attention benchmark, bf16 B=8 H=8 D=32 and 64
#   bash bench/gpu_session.sh sae         # SAE/BAE benchmark on the issue's shapes
#   bash bench/gpu_session.sh resources   # registers/spills per kernel (as on CPU) + first-call latency
#   bash bench/gpu_session.sh all         # all of the above, in this order
#
# Results go to $OUT (the device tool's output folder; default bench/results/gpu): CSVs named
# after the device, logs per stage. Commit the CSVs under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if torch.cuda.is_available() else 'nogpu')" 2>/dev/null)

stage_build() {
  # Hopper and Ampere code; nvcc threads keep the build inside one call.
  FASTATTN_CUDA_ARCHS=${FASTATTN_CUDA_ARCHS:-"80;90a"} MAX_JOBS=${MAX_JOBS:-16} \
    $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
  $PY -m fastattn info
}

stage_test() {
  $PY -m pytest -q -x -k "gpu or cuda" tests/test_circular_relative_attention.py tests/test_sae_ops.py \
    -p no:cacheprovider 2>&1 | tail -n 40
}

stage_sanitize() {
  # Small odd shapes: memcheck slows kernels down by orders of magnitude.
  for part in attention sae; do
    compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 $PY bench/gpu_sanitize.py $part \
      || echo "memcheck FAILED for $part"
  done
}

stage_attn() {
  for D in 32 64; do
    $PY bench/bench_circular_relative_attention.py --device cuda --dtype bfloat16 --B 8 --H 8 --D $D \
      --L 1024 4096 8192 --decode-Lk 4096 --max-L materialized=1024 reference=4096 \
      --out "$OUT/circular_relative_attention_${DEV}.csv"
  done
}

stage_sae() {
  for dt in bfloat16 float32; do
    $PY bench/bench_sae.py --device cuda --shape-set large --dtype $dt --out "$OUT/sae_${DEV}.csv"
  done
}

stage_resources() {
  # The ahead-of-time report (bench/gpu_resources.py, the same numbers a CPU machine gets) next
  # to what this GPU measures: the Triton op's first call with an empty cache, then a warm one.
  $PY bench/gpu_resources.py --quick --only attention cuda --first-call --out "$OUT/gpu_resources_${DEV}.csv"
}

run_stage() {
  echo "== $1 ($(date -u +%H:%M:%S))"
  "stage_$1" 2>&1 | tee "$OUT/$1.log"
}

case "${1:-all}" in
  all) for s in build test sanitize attn sae resources; do run_stage "$s"; done ;;
  build|test|sanitize|attn|sae|resources) run_stage "$1" ;;
  *) echo "usage: $0 [build|test|sanitize|attn|sae|resources|all]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The GPU runs that the open issues still need as proof, one stage per device call (each about 570 s).
#
#   bash benchmarks/proof_gpu.sh STAGE [OUT_DIR]      (from the repo root; OUT_DIR default $OUT)
#
# Stages, most useful first (each is a whole call; nothing else should run on the machine before it):
#   grid-e  issue 11: the points run 9 (RESULTS-fit_grid.md) did not re-run with the chunked dequantization,
#           expandable segments and the 128 MiB slack: 4096x1 at 8-40 GiB (bf16, isq 8), the no-paged twins of
#           its paged points, offload=cpu and stream, isq 4 at 20/40 GiB, bf16 4 GiB no-paged, the SDK's first
#           request (49 points, most of them fast)
#   grid-c  issue 11: the 70B isq 4 points (8192x8 never ran; loading alone took 234-304 s in run 8)
#   kernels issue 21: the GEMV sweep per layer with GemLite's int4/int8 GEMVs as a peer (its wheel in WHL_DIR)
#   quant   issue 21: the quantization GPU tests, then isq 8/4 decode and prefill vs bf16 with the int8 sweep
#   tests   the GPU tests of ISQ, GGUF blocks, offload, graphs and the head's slices, then graphs and offload
#           with expandable segments (not yet run with them on a GPU; about 150 s)
# gguf and pytest (not on the GPU machine's image) are installed from WHL_DIR/*.whl if present (default
# <repo>/.gpu-int/whl). Every budget is enforced inside the benchmarks (set_per_process_memory_fraction).
# GRID_S: the grid stages' limit in seconds (default 575: a whole call).
# DIAGNOSE=1: the grid stages record allocations, and each OOM's result lists what was alive (slower points).
set -uo pipefail
STAGE=${1:?stage: grid-e, grid-c, kernels, quant or tests}
OUT_DIR=${2:-${OUT:-/tmp/proof-out}}
WHL_DIR=${WHL_DIR:-$PWD/.gpu-int/whl}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*"; }
if ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then  # (a wheel built for another Python fails the whole install)
  python3 -m pip install -q --no-deps --root-user-action=ignore \
    $(ls "$WHL_DIR"/*.whl | grep -v -E -- "-cp3[0-9]+-cp3[0-9]+-" ; ls "$WHL_DIR"/*-cp3$(python3 -c 'import sys; print(sys.version_info[1])')-*.whl 2>/dev/null) 2>&1 | tail -2
fi
say "machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader); $(nproc) CPUs"
grid() {  # the fit grid's points matching $1, long ones first when $2 is given
  timeout "${GRID_S:-575}" python3 benchmarks/fit_grid.py --isq --parallel 6 --gpu-gib 132 --timeout 240 --deadline "${3:-320}" \
    --cpu-heavy "${CPU_HEAVY:-3}" \
    --nontorch-gib 0.74 --out "$OUT_DIR" --only "$1" ${2:+--first "$2"} ${DIAGNOSE:+--diagnose} >"$OUT_DIR/grid.log" 2>&1
  echo "rc $?"
  grep -v '^{' "$OUT_DIR/grid.log" | tail -80
}
case $STAGE in
grid-e) grid "^((bf16|isq8) (8|12|20|40)GiB (4096x1|8192x8 no-paged|32768x1 no-paged)|isq4 (20|40)GiB|bf16 4GiB (4096x1|32768x1) no-paged|bf16 full GPU)" "" 420 ;;
grid-c) grid "^70B isq4" "^70B isq4 \S+ 8192x8" 60 ;;
tests)
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_isq.py tests/test_gguf_gpu.py \
    tests/test_gguf_native.py tests/test_offload_gpu.py tests/test_gpu.py tests/test_graph_limits.py \
    tests/test_head_slices.py 2>&1 | tail -5
  say "graphs and offload again with expandable segments (what a --max-memory budget turns on: kv/pool.py)"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu.py tests/test_offload_gpu.py tests/test_graph_limits.py 2>&1 | tail -3
  ;;
kernels)
  timeout 560 python3 benchmarks/quant_kernels.py --short --gemlite --out "$OUT_DIR/kernels.json" >"$OUT_DIR/kernels.log" 2>&1
  echo "rc $?"
  grep -E "best|error|^\|" "$OUT_DIR/kernels.log" | tail -30
  ;;
quant)
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gguf_gpu.py tests/test_gguf_native.py \
    tests/test_isq.py 2>&1 | tail -6
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py tests/test_moe_kernels.py 2>&1 | tail -4
  timeout $((560 - (SECONDS - T0))) python3 benchmarks/quant.py --skip-spill --tune w8 --out "$OUT_DIR/quant.json" \
    >"$OUT_DIR/quant.log" 2>&1
  echo "rc $?"
  grep -E "best|tuned|^\|" "$OUT_DIR/quant.log" | tail -14
  ;;
*) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
say done

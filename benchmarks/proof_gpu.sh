#!/usr/bin/env bash
# The GPU runs that the open issues still need as proof, one stage per device call (each about 570 s).
#
#   bash benchmarks/proof_gpu.sh STAGE [OUT_DIR]      (from the repo root; OUT_DIR default $OUT)
#
# Stages, most useful first (each is a whole call; nothing else should run on the machine before it):
#   moe     issue 16: spillover bf16 and --isq 4 with accelerate in the same call (about 330 s), then the GPU
#           tests of the kernels this session changed (about 60 s)
#   grid-a  issue 11, what run 8 left or changed (11 points, most computing on the CPU): bf16 8 and 12 GiB with
#           a 32k prompt (their activation reserve shrank: 80b27e3), bf16 4 GiB 8192x8 no-paged and 32768x1
#           (lost to the harness in run 8), isq 8 at 4 GiB (planned 1.15-1.20x peak in run 8)
#   grid-b  issue 11: isq 4 at 12, 8 and 4 GiB (18 points; run 8 ran the 40 and 20 GiB ones)
#   dq      issue 11: the GPU tests of ISQ, GGUF blocks and offload, then 17 grid points at 4-12 GiB (after the
#           prompt's dequantization by chunks, expandable segments under a budget and a 128 MiB slack)
#   grid-c  issue 11: the 70B isq 4 points of 8192x8 (2; run 8 ran the 4096x1 ones: 234-304 s of loading)
#   tests   issue 21: the GPU tests of the symmetric int8 form (third session of 2026-12-02, never run on CUDA)
#           and of ISQ (about 90 s; then a grid stage fits the same call with GRID_S=450)
#   kernels issue 21: the GEMV sweep per layer with GemLite's int4/int8 GEMVs as a peer (its wheel in WHL_DIR)
#   quant   issue 21: the quantization GPU tests, then isq 8/4 decode and prefill vs bf16 with the int8 sweep
#   spill   issue 11: the six bf16 points that ran out of time in run 7 (4 and 8 GiB with 8 x 8k prompts, 4 GiB
#           with a 32k prompt), now with room to stream their CPU layers for the prompts, and offload cpu and
#           stream at 8 GiB; then the GPU tests of GGUF blocks (issue 21); about 330 s (run 8 ran it)
# gguf and pytest (not on the GPU machine's image) are installed from WHL_DIR/*.whl if present (default
# <repo>/.gpu-int/whl). Every budget is enforced inside the benchmarks (set_per_process_memory_fraction).
# GRID_S: the grid stages' limit in seconds (default 575: a whole call).
# DIAGNOSE=1: the grid stages record allocations, and each OOM's result lists what was alive (slower points).
set -uo pipefail
STAGE=${1:?stage: moe, grid-a, grid-b, dq, grid-c, tests, kernels, quant or spill}
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
moe)
  timeout 400 python3 benchmarks/moe.py --new 32 --acc-new 1 --out "$OUT_DIR/moe.json" >"$OUT_DIR/moe.log" 2>&1
  echo "rc $?"
  grep -v '^\s*$' "$OUT_DIR/moe.log" | tail -8
  say "GPU tests of this session's changes"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_offload_gpu.py 2>&1 | tail -6
  ;;
grid-a) grid "^(bf16 (8|12)GiB 32768x1|bf16 4GiB (8192x8 no-paged|32768x1)|isq8 4GiB)" "^bf16" 360 ;;
grid-b) grid "^isq4 (12|8|4)GiB" "" 360 ;;
dq)  # the chunked dequantization, expandable segments and a smaller slack (fourth session of 2026-12-02)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_isq.py tests/test_gguf_gpu.py \
    tests/test_gguf_native.py tests/test_offload_gpu.py 2>&1 | tail -5
  grid "^(isq8 4GiB|isq4 4GiB|bf16 (4|8|12)GiB 32768x1 paged|isq4 8GiB 8192x8)" "^isq4 4GiB" 330 ;;
grid-c) grid "^70B isq4 \S+ 8192x8" "" 60 ;;
spill)
  say "spillover plan on the GPU machine (issue 14: no torch unless a GPU driver is there; then it finds cuda:0)"
  mkdir -p /tmp/l8b && python3 -c "import json,sys; sys.path.insert(0,'benchmarks'); from shapes import LLAMA31_8B as s
json.dump(s, open('/tmp/l8b/config.json','w'))"
  python3 -c "from spillover.placement.inventory import gpu_driver_installed as g; print('driver found:', g())"
  python3 -m spillover.cli.main plan -m /tmp/l8b --max-memory cuda:0=8GiB 2>&1 | tail -4
  grid "^bf16 (8GiB 8192x8|4GiB 8192x8|4GiB 32768x1|8GiB 4096x1 paged offload=(cpu|stream))" "" 250
  say "GPU tests: GGUF blocks streamed (issue 21)"
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gguf_native.py 2>&1 | tail -4
  ;;
tests)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gguf_gpu.py tests/test_quant_kernels.py \
    -k "symmetric or groups_of_16 or gpu_paths or (on_a_gpu and not q4_k_m)" 2>&1 | tail -4
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_isq.py tests/test_gguf_native.py 2>&1 | tail -4
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

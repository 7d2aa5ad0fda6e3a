#!/usr/bin/env bash
# One command on the GPU machine for issue 20: llama.cpp (CUDA) next to spillover, same run, same machine.
#
#   bash benchmarks/llamacpp_gpu.sh [OUT_DIR] [PACK_DIR]      (from the repo root; OUT_DIR default $OUT)
#
# PACK_DIR (default <repo>/.gpu-llamacpp) holds what benchmarks/llamacpp_build.sh made: the binaries
# (llamacpp-cuda-sm90.tar.xz) or, without them, the trimmed source (llamacpp-src.tar.xz), which is then built
# here on cores 2-15 (nice 19) while cores 0-1 write the GGUF and run spillover's whole-GPU rows; the binaries
# are copied to OUT_DIR for the next run. gguf (not on the GPU machine's image) is installed from
# PACK_DIR/whl/*.whl if present. Steps, most important first after the build: offload.py at 8 GiB (spillover
# auto + llama.cpp -ngl by --fit and by hand), gpu.py's whole-GPU rows, the fit comparison over fit_grid's budgets.
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/llamacpp-out}}
PACK_DIR=$(cd "${2:-$PWD/.gpu-llamacpp}" && pwd)
mkdir -p "$OUT_DIR"
export LLAMACPP_PACK_DIR=$PACK_DIR LLAMACPP_LOG_DIR=$OUT_DIR PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
G=/tmp/llamacpp-gguf && mkdir -p $G
BF16=$G/llama3-8b-offload-bf16.gguf Q4=$G/llama3-8b-Q4_K_M.gguf
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*"; }
if ls "$PACK_DIR"/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$PACK_DIR"/whl/*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
say "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader); $(nproc) CPUs;" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
PIN0=() PIN1=() BUILD=
if [ ! -f "$PACK_DIR/llamacpp-cuda-sm90.tar.xz" ]; then
  if command -v taskset >/dev/null && [ "$(nproc)" -ge 8 ]; then
    PIN0=(taskset -c 0,1) PIN1=(taskset -c 2-$(($(nproc) - 1)))
    export OMP_NUM_THREADS=2  # phase 1 (cores 0-1) while the build runs; unset below
  fi
  say "building llama.cpp (log: build.log)"
  (JOBS=$(($(nproc) - 2)) "${PIN1[@]}" bash benchmarks/llamacpp_build.sh "$PACK_DIR" > "$OUT_DIR/build.log" 2>&1
   echo "build exit $?" >> "$OUT_DIR/build.log") &
  BUILD=$!
fi
say "bf16 GGUF of offload.py's weights"
"${PIN0[@]}" python3 benchmarks/llamacpp.py gguf $BF16 --offload-weights
say "spillover whole-GPU rows (bf16 from the GGUF, isq 4)"
"${PIN0[@]}" python3 benchmarks/gpu.py --llamacpp --gguf-bf16 $BF16 --engines "spillover bf16,spillover isq 4" \
  --llamacpp-json "$OUT_DIR/gpu_llamacpp.json" > "$OUT_DIR/gpu_spillover.log" 2>&1
tail -4 "$OUT_DIR/gpu_spillover.log"
if [ -n "$BUILD" ]; then
  wait $BUILD; tail -3 "$OUT_DIR/build.log"
  cp "$PACK_DIR/llamacpp-cuda-sm90.tar.xz" "$OUT_DIR/" 2>/dev/null
fi
unset OMP_NUM_THREADS
say "llama.cpp check"
python3 benchmarks/llamacpp.py check || exit 1
say "Q4_K_M GGUF"
python3 benchmarks/llamacpp.py gguf unused --skip-bf16 --q4km $Q4
say "offload.py at 8 GiB"
python3 benchmarks/offload.py --budgets 8 --modes auto,llamacpp --decode-tokens 32 --llamacpp-gguf $BF16 \
  --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/offload.log" | grep -v "^\s*$" | tail -8
say "gpu.py llama.cpp whole-GPU rows"
python3 benchmarks/gpu.py --llamacpp --gguf-bf16 $BF16 --gguf-q4km $Q4 --engines "llama.cpp bf16,llama.cpp Q4_K_M" \
  --llamacpp-json "$OUT_DIR/gpu_llamacpp.json" 2>&1 | tee "$OUT_DIR/gpu.log" | tail -8
say "fit comparison"
python3 benchmarks/llamacpp.py fit $BF16 --budgets 4,8,12,20,40 --out "$OUT_DIR/fit.json" 2>&1 | tee "$OUT_DIR/fit.log"
say "done"

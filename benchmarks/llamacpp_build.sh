#!/usr/bin/env bash
# Build a CUDA llama.cpp (llama-bench, llama-quantize, llama-fit-params; not llama-cli/llama-server: they need the server + web UI build) for sm_90 only and pack it
# for the GPU machine (issue 20). Binaries are never committed: the pack goes to an ignored folder.
#
#   bash benchmarks/llamacpp_build.sh [PACK_DIR]     (default PACK_DIR: .gpu-llamacpp/ in the repo root)
#
# Source: llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist from PyPI (llama.cpp commit 0c1e57098,
# per that sdist's CHANGELOG), checked by sha256. Needs nvcc 13 + cmake + ninja + gcc; the GPU needs none of
# them. cuBLAS headers/libs come from PyPI's nvidia-cublas wheel when the CUDA toolkit has none; at run time
# the GPU machine's own libcublas.so.13 (torch's nvidia-cublas) is used (benchmarks/llamacpp.py finds it).
# CPU backend: two runtime-selected variants (haswell/zen4; GGML_BACKEND_DL), so
# llama.cpp's CPU layers use the best SIMD of whatever CPU the GPU machine has.
# Runs under nice -n 19 (shared 2-core machine); ~1-2 h there, a few minutes on 16 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PACK_DIR=${1:-$ROOT/.gpu-llamacpp}
WORK=${LLAMACPP_WORK:-/tmp/llamacpp-build}
VER=0.3.36
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
COMMIT=0c1e57098
JOBS=${JOBS:-$(nproc)}
# FlashAttention kernels are ~40% of the CUDA compile; off by default here (2-core machine). With them off
# llama.cpp runs attention unfused (KQ, softmax, KQV). LLAMACPP_CUDA_FA=ON builds them.
FA=${LLAMACPP_CUDA_FA:-OFF}
mkdir -p "$WORK" "$PACK_DIR"
cd "$WORK"
if [ ! -f llama_cpp_python-$VER.tar.gz ]; then
  # the sdist's metadata step needs scikit-build-core; --no-build-isolation keeps pip from building anything
  python3 -m pip install -q --target "$WORK/skb" scikit-build-core
  PYTHONPATH="$WORK/skb" python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
    "llama-cpp-python==$VER" -d .
fi
echo "$SHA  llama_cpp_python-$VER.tar.gz" | sha256sum -c -
[ -d llama_cpp_python-$VER ] || tar xzf llama_cpp_python-$VER.tar.gz
SRC=$WORK/llama_cpp_python-$VER/vendor/llama.cpp
# keep 2 x86 CPU variants of the 14 GGML_CPU_ALL_VARIANTS builds (time on a 2-core machine): haswell (AVX2)
# and zen4 (AVX512 + VNNI + BF16: also Sapphire/Emerald/Granite Rapids, without AMX)
[ -f "$SRC/ggml/src/CMakeLists.txt.orig" ] || cp "$SRC/ggml/src/CMakeLists.txt" "$SRC/ggml/src/CMakeLists.txt.orig"
sed -E '/ggml_add_cpu_backend_variant\((x64|sse42|sandybridge|ivybridge|piledriver|skylakex|cannonlake|cascadelake|icelake|cooperlake|alderlake|sapphirerapids)( |\))/d' \
  "$SRC/ggml/src/CMakeLists.txt.orig" > "$SRC/ggml/src/CMakeLists.txt"

# MMQ (quantized matmul) kernels: only the types a Q4_K_M file of a dense model uses (q4_K, q6_K) are
# compiled; other types abort with a message instead of running (LLAMACPP_MMQ_ALL=1 keeps all 22).
MMQ_KEEP="q4_k q6_k"
if [ "${LLAMACPP_MMQ_ALL:-0}" != 1 ]; then
  CU=$SRC/ggml/src/ggml-cuda
  [ -f "$CU/mmq.cu.orig" ] || cp "$CU/mmq.cu" "$CU/mmq.cu.orig"
  perl -pe 's/mul_mat_q_case<GGML_TYPE_(?!Q4_K>|Q6_K>)[^;]*;/GGML_ABORT("llamacpp_build.sh: MMQ kernels of this type not built");/' \
    "$CU/mmq.cu.orig" > "$CU/mmq.cu"
  mkdir -p "$CU/template-instances.unused"
  for f in "$CU"/template-instances/mmq-instance-*.cu; do
    t=$(basename "$f" .cu); t=${t#mmq-instance-}
    case " $MMQ_KEEP " in *" $t "*) ;; *) mv "$f" "$CU/template-instances.unused/";; esac
  done
fi

CUBLAS_ARGS=()
CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
if [ ! -e "$CUDA_ROOT/include/cublas_v2.h" ]; then
  python3 -m pip install -q --no-deps --target "$WORK/cublas" "nvidia-cublas==13.1.0.3"
  CB=$WORK/cublas/nvidia/cu13
  ln -sf libcublas.so.13 "$CB/lib/libcublas.so"; ln -sf libcublasLt.so.13 "$CB/lib/libcublasLt.so"
  CUBLAS_ARGS=(-DCUDA_cublas_LIBRARY="$CB/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$CB/lib/libcublasLt.so"
               -DCMAKE_CUDA_FLAGS="-I$CB/include" -DCMAKE_CXX_FLAGS="-I$CB/include" -DCMAKE_C_FLAGS="-I$CB/include")
fi

if [ ! -e "$CUDA_ROOT/lib64/libcuda.so" ] && [ ! -e "$CUDA_ROOT/lib64/stubs/libcuda.so" ]; then
  # no driver here: link ggml-cuda against an empty libcuda.so.1 stub (cu* symbols resolve on the GPU machine)
  mkdir -p "$WORK/stubs"
  gcc -shared -o "$WORK/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 -x c /dev/null
  CUBLAS_ARGS+=(-DCUDA_cuda_driver_LIBRARY="$WORK/stubs/libcuda.so")
fi

cmake -S "$SRC" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA=$FA -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF \
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DCMAKE_BUILD_RPATH='$ORIGIN' -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  "${CUBLAS_ARGS[@]}"
# objects compiled elsewhere (an earlier, interrupted run of this script: LLAMACPP_PREBUILT=<dir holding
# build-relative .o paths>) are reused by a compiler launcher instead of compiled again
if [ -n "${LLAMACPP_PREBUILT:-}" ]; then
  L=$ROOT/benchmarks/llamacpp_reuse.sh
  cmake build -DCMAKE_C_COMPILER_LAUNCHER="$L" -DCMAKE_CXX_COMPILER_LAUNCHER="$L" -DCMAKE_CUDA_COMPILER_LAUNCHER="$L"
fi
# the CUDA backend first (the slow part), then the rest
nice -n 19 cmake --build build -j "$JOBS" --target ggml-cuda
nice -n 19 cmake --build build -j "$JOBS" --target llama-bench llama-quantize llama-fit-params

# pack: executables + ggml/llama shared libs + the backends (dlopened from the executable's folder)
rm -rf pack && mkdir -p pack/llamacpp
cp build/bin/llama-bench build/bin/llama-quantize build/bin/llama-fit-params pack/llamacpp/
cp -P build/bin/*.so* pack/llamacpp/ 2>/dev/null || true
find build -name '*.so*' -not -path '*/CMakeFiles/*' -exec cp -P {} pack/llamacpp/ \;
GOMP=$(gcc -print-file-name=libgomp.so.1); [ -f "$GOMP" ] && cp -L "$GOMP" pack/llamacpp/
strip --strip-unneeded pack/llamacpp/* 2>/dev/null || true
echo "llama.cpp $COMMIT (llama-cpp-python $VER sdist, sha256 $SHA), CUDA sm_90, FA kernels $FA, $(nvcc --version | tail -1)" \
  > pack/llamacpp/BUILD_INFO
tar -C pack -cf - llamacpp | xz -T0 -6 > "$PACK_DIR/llamacpp-cuda-sm90.tar.xz"
ls -la "$PACK_DIR/llamacpp-cuda-sm90.tar.xz"; cat pack/llamacpp/BUILD_INFO

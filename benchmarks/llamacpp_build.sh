#!/usr/bin/env bash
# Build a CUDA llama.cpp for sm_90 only (llama-bench, llama-quantize, llama-fit-params; not llama-cli /
# llama-server: they need the server and its web UI built too) and pack it (issue 20). Binaries are never
# committed: everything goes to an ignored folder.
#
#   bash benchmarks/llamacpp_build.sh [PACK_DIR]        (default PACK_DIR: <repo>/.gpu-llamacpp)
#
# Source: llama.cpp as vendored in the llama-cpp-python 0.3.36 sdist from PyPI (llama.cpp commit 0c1e57098,
# per that sdist's CHANGELOG), checked by sha256. The first run (with network) also writes a trimmed source
# tarball PACK_DIR/llamacpp-src.tar.xz; a run that finds it builds from it, so the GPU machine (no network)
# can build: benchmarks/llamacpp_gpu.sh does, on its 16 cores, when PACK_DIR holds no binaries yet.
# Needs nvcc 13, cmake, ninja, gcc. cuBLAS headers come from the toolkit, a pip nvidia-cublas (cu13) package
# already installed, or (with network) PyPI's nvidia-cublas wheel; at run time the machine's own
# libcublas.so.13 is used (benchmarks/llamacpp.py puts it on LD_LIBRARY_PATH).
# What is left out to keep the build short (all switchable): FlashAttention kernels (LLAMACPP_CUDA_FA=ON builds
# them; without them llama.cpp runs attention unfused: KQ, softmax, KQV), MMQ kernels of quantized types other
# than q4_K and q6_K, the types of a Q4_K_M file (LLAMACPP_MMQ_ALL=1 builds all), CPU variants other than
# haswell (AVX2) and zen4 (AVX512 + VNNI + BF16: also Sapphire/Emerald/Granite Rapids), chosen at run time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PACK_DIR=$(mkdir -p "${1:-$ROOT/.gpu-llamacpp}" && cd "${1:-$ROOT/.gpu-llamacpp}" && pwd)
WORK=${LLAMACPP_WORK:-/tmp/llamacpp-build}
VER=0.3.36
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
COMMIT=0c1e57098
JOBS=${JOBS:-$(nproc)}
FA=${LLAMACPP_CUDA_FA:-OFF}
SRC=$WORK/llama.cpp
mkdir -p "$WORK"
cd "$WORK"

if [ ! -f "$SRC/CMakeLists.txt" ]; then
  if [ -f "$PACK_DIR/llamacpp-src.tar.xz" ]; then
    tar -xJf "$PACK_DIR/llamacpp-src.tar.xz" -C "$WORK"
  else
    if [ ! -f llama_cpp_python-$VER.tar.gz ]; then
      # the sdist's metadata step needs scikit-build-core; --no-build-isolation keeps pip from building anything
      python3 -m pip install -q --target "$WORK/skb" scikit-build-core
      PYTHONPATH="$WORK/skb" python3 -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$VER" -d .
    fi
    echo "$SHA  llama_cpp_python-$VER.tar.gz" | sha256sum -c -
    rm -rf sdist && mkdir sdist && tar -xzf llama_cpp_python-$VER.tar.gz -C sdist
    mv sdist/llama_cpp_python-$VER/vendor/llama.cpp "$SRC" && rm -rf sdist
    (cd "$SRC" && rm -rf models docs media tests benches gguf-py examples tools/ui tools/server/public* \
      && for d in ggml/src/ggml-*/; do case $d in *ggml-cpu/|*ggml-cuda/) ;; *) rm -rf "$d";; esac; done \
      && find . -name '.git*' -prune -exec rm -rf {} +)
    echo "$COMMIT" > "$SRC/LLAMACPP_COMMIT"
    tar -C "$WORK" -cf - llama.cpp | xz -T0 -6 > "$PACK_DIR/llamacpp-src.tar.xz"
  fi
  # keep 2 x86 CPU variants of GGML_CPU_ALL_VARIANTS' 14
  sed -i -E '/ggml_add_cpu_backend_variant\((x64|sse42|sandybridge|ivybridge|piledriver|skylakex|cannonlake|cascadelake|icelake|cooperlake|alderlake|sapphirerapids)( |\))/d' \
    "$SRC/ggml/src/CMakeLists.txt"
  if [ "${LLAMACPP_MMQ_ALL:-0}" != 1 ]; then
    CU=$SRC/ggml/src/ggml-cuda
    perl -pi -e 's/mul_mat_q_case<GGML_TYPE_(?!Q4_K>|Q6_K>)[^;]*;/GGML_ABORT("llamacpp_build.sh: MMQ kernels of this type not built");/' "$CU/mmq.cu"
    for f in "$CU"/template-instances/mmq-instance-*.cu; do
      case $f in *-q4_k.cu|*-q6_k.cu) ;; *) rm "$f";; esac
    done
  fi
fi

EXTRA=()
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
if [ ! -e "$CUDA_ROOT/include/cublas_v2.h" ]; then
  CB=$(python3 -c 'import glob,sys; print(next(iter(sorted({p.rsplit("/include/",1)[0] for d in sys.path for p in glob.glob(d+"/nvidia/cu13/include/cublas_v2.h")})),""))')
  if [ -z "$CB" ]; then
    python3 -m pip install -q --no-deps --target "$WORK/cublas" "nvidia-cublas==13.1.0.3"
    CB=$WORK/cublas/nvidia/cu13
  fi
  mkdir -p "$WORK/cublas-link"
  ln -sf "$(ls "$CB"/lib/libcublas.so.13* | head -1)" "$WORK/cublas-link/libcublas.so"
  ln -sf "$(ls "$CB"/lib/libcublasLt.so.13* | head -1)" "$WORK/cublas-link/libcublasLt.so"
  EXTRA+=(-DCUDA_cublas_LIBRARY="$WORK/cublas-link/libcublas.so" -DCUDA_cublasLt_LIBRARY="$WORK/cublas-link/libcublasLt.so"
          -DCMAKE_CUDA_FLAGS="-I$CB/include" -DCMAKE_CXX_FLAGS="-I$CB/include" -DCMAKE_C_FLAGS="-I$CB/include")
fi
if ! compgen -G "$CUDA_ROOT/lib64/libcuda.so" >/dev/null && ! compgen -G "$CUDA_ROOT/lib64/stubs/libcuda.so" >/dev/null \
   && ! compgen -G "$CUDA_ROOT/targets/*/lib/stubs/libcuda.so" >/dev/null; then
  # no driver library to link against: an empty libcuda.so.1 stub (cu* symbols resolve where the driver is).
  # --no-as-needed: the stub defines no symbol, and a linker that drops unneeded libraries (Ubuntu's default)
  # would leave libggml-cuda.so without libcuda.so.1, so dlopen fails on cuMemCreate & co and llama.cpp
  # silently sees no GPU (seen in the first GPU run)
  mkdir -p "$WORK/stubs"
  gcc -shared -o "$WORK/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 -x c /dev/null
  EXTRA+=(-DCUDA_cuda_driver_LIBRARY="$WORK/stubs/libcuda.so")
fi
# --no-as-needed always, for shared and module libraries (libggml-cuda.so is a MODULE with GGML_BACKEND_DL):
# the toolkit's own stubs/libcuda.so (there where nvcc is installed system-wide) is dropped the same way
# (seen building on the CPU machine: libggml-cuda.so then named no libcuda.so.1)
EXTRA+=(-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--no-as-needed -DCMAKE_MODULE_LINKER_FLAGS=-Wl,--no-as-needed)

cmake -S "$SRC" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_CUDA_FA=$FA -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF \
  -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DCMAKE_BUILD_RPATH='$ORIGIN' -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  "${EXTRA[@]}" > "$WORK/configure.log"
nice -n 19 cmake --build build -j "$JOBS" --target llama-bench llama-quantize llama-fit-params

if ! readelf -d build/bin/libggml-cuda.so | grep -q 'libcuda.so.1'; then
  echo "libggml-cuda.so does not name libcuda.so.1: it would not load (undefined cu* symbols)" >&2
  exit 1
fi

# pack: executables, the ggml/llama shared libraries and backends (dlopened from the executables' folder)
rm -rf pack && mkdir -p pack/llamacpp
cp build/bin/llama-bench build/bin/llama-quantize build/bin/llama-fit-params pack/llamacpp/
find build -name '*.so*' -not -path '*/CMakeFiles/*' -exec cp -P {} pack/llamacpp/ \;
GOMP=$(gcc -print-file-name=libgomp.so.1); [ -f "$GOMP" ] && cp -L "$GOMP" pack/llamacpp/
strip --strip-unneeded pack/llamacpp/* 2>/dev/null || true
echo "llama.cpp $COMMIT (llama-cpp-python $VER sdist, sha256 $SHA), CUDA sm_90, FA kernels $FA," \
  "MMQ $([ "${LLAMACPP_MMQ_ALL:-0}" = 1 ] && echo all || echo q4_K/q6_K), $(nvcc --version | tail -1)" \
  > pack/llamacpp/BUILD_INFO
tar -C pack -cf - llamacpp | xz -T0 -6 > "$PACK_DIR/llamacpp-cuda-sm90.tar.xz"
ls -la "$PACK_DIR"; cat pack/llamacpp/BUILD_INFO

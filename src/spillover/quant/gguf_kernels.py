"""The CPU kernels of `gguf_cpu.c`: GGUF blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) multiplied as stored.

Why a C file: torch's CPU int4/int8 kernels take bf16 activations, round every output to bf16 and take bf16
(scale, zero) pairs, so the default mode agreed with the f32 reference on only 97% of next tokens; they also
read ~13 GiB/s, and with the casts around them a decode step could not reach llama.cpp's. These kernels read
the file's blocks (the bytes llama.cpp reads) and keep activations to 15-16 significant bits with f32 scales
and accumulation:
- decode (up to `GEMV_ROWS` rows): Q4_0/Q4_1 codes x bf16 hi + lo activation parts (AVX512-BF16); Q8_0, Q5_0,
  Q4_K, Q6_K codes x int16 activations per block of 32 (VNNI vpdpwssd); Q5_K dequantized per block in f32;
- prompts: a tiled GEMM of int16 dot products for every type but Q5_K (`gemm`, and the prefill layer of Llama
  and Gemma 3); Q5_K dequantized (exactly, as the loader) into torch's f32 GEMM.
SmolLM2: 99.84% top-1 agreement with f32 (benchmarks/NOTES-cpu.md).

The library is compiled on first use with the system C compiler (`cc -O3 -march=native -fopenmp`, about a
second) into `~/.cache/spillover/` (`$SPILLOVER_CACHE`), keyed by the source, the flags and the CPU, and
loaded with ctypes after torch, so it shares torch's OpenMP runtime. Without a compiler (or with
`SPILLOVER_CPU_KERNELS=0`) `library()` is None and quant/gguf_native.py uses torch's int4/int8 kernels.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from spillover import native
from spillover.quant.formats import GGUF_BLOCKS, GGUF_CPU_SOURCE

SOURCE = GGUF_CPU_SOURCE
TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
"""Storage types the kernels read -> their ggml type number (gguf_cpu.c)."""
BLOCK_BYTES = {t: b for t, (_, b) in GGUF_BLOCKS.items()}
BLOCK_SIZE = {t: w for t, (w, _) in GGUF_BLOCKS.items()}
"""Weights per block."""
GEMV_ROWS = 8
"""Up to this many input rows take the GEMV (decode); more rows the GEMM (`gemm`)."""
FLAGS = native.FLAGS


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use and cached), or None where they cannot be built or loaded."""
    lib = native.build(SOURCE, FLAGS)
    if lib is None:
        return None
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.gguf_gemv.argtypes = [p, i, i64, i64, p, i64, p, i]
    lib.gguf_gemv.restype = None
    lib.gguf_gemv_q8_off.argtypes = [p, p, i64, i64, p, i64, p, i]
    lib.gguf_gemv_q8_off.restype = None
    lib.gguf_dequant.argtypes = [p, i, i64, i64, p, i]
    lib.gguf_dequant.restype = None
    lib.gguf_gemm.argtypes = [p, i, i64, i64, p, i64, p, i64, i]
    lib.gguf_gemm.restype = i
    lib.gguf_gemm_ok.argtypes = []
    lib.gguf_gemm_ok.restype = i
    for f in (lib.gguf_llama_prefill_qkv, lib.gguf_llama_prefill_mlp):
        f.argtypes, f.restype = [p, p, p, i], i
    lib.gguf_attn_causal.argtypes = [p, i64, i64, i64, i64, i64, ctypes.c_float, p, i64, i]
    lib.gguf_attn_causal.restype = i
    lib.gguf_llama_decode.argtypes = [p, p, i]
    lib.gguf_llama_decode.restype = i
    return lib


def gemv(w: torch.Tensor, qtype: str, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] f32 contiguous, w [N, K / block size * block bytes] uint8 -> x W^T [M, N] f32 (any M; fast
    for few)."""
    M, K = x.shape
    y = torch.empty(M, w.shape[0]) if out is None else out
    library().gguf_gemv(
        w.data_ptr(), TYPES[qtype], w.shape[0], K, x.data_ptr(), M, y.data_ptr(), torch.get_num_threads()
    )
    return y


def gemv_q8_off(w: torch.Tensor, offset: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] f32 contiguous, w: Q8_0 rows [N, K / 32 * 34] uint8 whose groups also carry offsets m (f16
    [N, K / 32], contiguous): x W^T [M, N] f32 with w = d (q + 128) + m (isq 8's blocks layout, quant/isq.py)."""
    M, K = x.shape
    y = torch.empty(M, w.shape[0])
    library().gguf_gemv_q8_off(
        w.data_ptr(), offset.data_ptr(), w.shape[0], K, x.data_ptr(), M, y.data_ptr(), torch.get_num_threads()
    )
    return y


def gemm(w: torch.Tensor, qtype: str, x: torch.Tensor, out: torch.Tensor) -> bool:
    """out [M, >= N] (columns 0..N, any row stride) = x [M, K] W^T for rows w [N, K / block size * block bytes]
    of Q4_0, Q4_1, Q5_0, Q8_0, Q4_K or Q6_K (prompts): a GEMM of int16 dot products from the codes, x quantized
    per 32-element block to int16 (15 bits against the block's largest), scales, block sums and accumulation
    f32. False for other types or where this CPU lacks AVX512-VNNI (nothing written: dequantize instead)."""
    M, K = x.shape
    rc = library().gguf_gemm(w.data_ptr(), TYPES[qtype], w.shape[0], K, x.data_ptr(), M, out.data_ptr(),
                             out.stride(0), torch.get_num_threads())  # fmt: skip
    if rc == -2:
        raise MemoryError("gguf_gemm: no memory for its scratch buffers")
    return rc == 0


def dequant(w: torch.Tensor, qtype: str, k: int) -> torch.Tensor:
    """w [N, k / block size * block bytes] uint8 -> the f32 weights [N, k] (exactly the loader's)."""
    out = torch.empty(w.shape[0], k)
    library().gguf_dequant(w.data_ptr(), TYPES[qtype], w.shape[0], k, out.data_ptr(), torch.get_num_threads())
    return out


class LayerArgs(ctypes.Structure):
    """`Layer` of gguf_cpu.c: one Llama-style decoder layer's weights and one step's attention inputs."""

    _fields_ = [
        *((n, ctypes.c_int64) for n in ("T", "H", "nh", "nkv", "hd", "rot", "I", "L")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *((n, ctypes.c_void_p) for n in ("ln1", "ln2", "bqkv", "wqkv", "wo", "wgu", "wd")),
        *((n, ctypes.c_int) for n in ("tqkv", "to", "tgu", "td")),
        *((n, ctypes.c_void_p) for n in ("cos", "sin", "kc", "vc", "slot", "dec_slots", "lens")),
        ("nqkv1", ctypes.c_int64),
        *((n, ctypes.c_void_p) for n in ("qn", "kn", "lnpa", "lnpf", "wqkv2")),
        *((n, ctypes.c_int) for n in ("tqkv2", "act")),
    ]


def prefill_layer(args: LayerArgs, x: torch.Tensor, attend: Any, rows: torch.Tensor | None = None) -> bool:
    """Prompt rows x [T, H] f32 (in place) through gguf_cpu.c's Llama layer in two calls: norm, qkv GEMM, rope
    and the K/V write; `attend(qkv [T, QKV]) -> [T, nh * hd]` (the caller's SDPA); then o, norm and the MLP, of
    `rows` only where given (the model's last layer: the rows a logit reads; the others keep x unchanged). False
    where the kernels cannot run it (nothing changed)."""
    lib = library()
    qkv = torch.empty(x.shape[0], (args.nh + 2 * args.nkv) * args.hd)
    rc = lib.gguf_llama_prefill_qkv(ctypes.byref(args), x.data_ptr(), qkv.data_ptr(), torch.get_num_threads())
    if rc == -1:
        return False
    if rc:
        raise MemoryError(f"gguf_llama_prefill_qkv failed ({rc})")
    att = attend(qkv).contiguous()
    y = x
    if rows is not None:  # the second call's rows are independent: run it on the selected ones
        att, y, args.T = att.index_select(0, rows), x.index_select(0, rows), len(rows)
    rc = lib.gguf_llama_prefill_mlp(ctypes.byref(args), y.data_ptr(), att.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"gguf_llama_prefill_mlp failed ({rc})")
    if rows is not None:
        x.index_copy_(0, rows, y)
    return True


def attn_causal(qkv: torch.Tensor, start: int, n: int, args: LayerArgs, out: torch.Tensor) -> bool:
    """Causal attention of rows start .. start + n of qkv [T, (nh + 2 nkv) hd] (one fresh prompt, roped) into
    the same rows of out [T, nh hd]; False where the kernel does not run (nothing written)."""
    rc = library().gguf_attn_causal(
        qkv.data_ptr() + start * qkv.stride(0) * 4, n, qkv.stride(0), args.nh, args.nkv, args.hd, args.scale,
        out.data_ptr() + start * out.stride(0) * 4, out.stride(0), torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:
        raise MemoryError("gguf_attn_causal: no memory for its scratch buffer")
    return rc == 0


@functools.cache
def gemm_ok() -> bool:
    """Whether the prompt GEMM of Q4 blocks (and the prefill layer) runs on this CPU (AVX512-VNNI)."""
    return library() is not None and library().gguf_gemm_ok() == 1


def decode_layer(args: LayerArgs, x: torch.Tensor) -> None:
    """Run gguf_cpu.c's Llama decode layer on x [T, H] f32 (in place)."""
    rc = library().gguf_llama_decode(ctypes.byref(args), x.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"gguf_llama_decode failed ({rc})")

"""bf16 linears computed on the CPU, at decode: the C GEMV of cpu_gemv.c instead of torch's.

When a model spills, its decode step is the time the CPU takes to read the weights of the layers it computes
(and of CPU experts, layers/moe.py). torch's bf16 linear reads them at about half of what the host memory
gives on the GPU machines (oneDNN 32-39 GB/s, torch's own GEMV 39-60 GB/s; llama.cpp reads about 90 GB/s on
the same H200 host, benchmarks/NOTES-offload.md). cpu_gemv.c streams them with AVX-512 (4 rows in flight per
thread, the next rows prefetched), converting each bf16 weight to f32 exactly and accumulating in f32, as
torch's bf16 linear does.

`CPULinear` is an `nn.Linear` whose forward takes that path for up to GEMV_ROWS rows of a CPU input and bf16
weight; anything else (prompts, a weight streamed to a GPU, no compiler) is torch's linear. `use_cpu_gemv_`
turns the CPU-resident bf16 linears of a loaded model into it (a transform: the parameters are not touched).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spillover import native

SOURCE = Path(__file__).with_name("cpu_gemv.c")
GEMV_ROWS = 8
"""Up to this many input rows take the C GEMV (decode steps); more are a GEMM, where torch's oneDNN wins."""


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.build(SOURCE)
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.cpu_gemv_bf16.argtypes = [p, i64, i64, i64, p, i64, p, i64, i64, p, ctypes.c_int]
        lib.cpu_gemv_bf16.restype = None
        lib.cpu_decode_attn.argtypes = [p, p, p, ctypes.c_int, p, p, i64, i64, i64, i64, i64, ctypes.c_float]
        lib.cpu_decode_attn.argtypes += [p, ctypes.c_int]
        lib.cpu_decode_attn.restype = ctypes.c_int
    return lib


def decode_attention(
    q: torch.Tensor,  # [B, nh, hd]
    k_cache: torch.Tensor,  # [S, nkv, hd], bf16 or f32
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [B, L] int64: the slots each sequence attends to
    lens: torch.Tensor | None,  # [B] int32: how many of them are real (None: all L)
    scale: float,
) -> torch.Tensor | None:
    """One query per sequence over a paged CPU cache, read in place (cpu_gemv.c `cpu_decode_attn`): [B, nh, hd]
    in q's dtype, computed in f32. None when it does not apply (no compiler, another dtype or layout)."""
    lib = library()
    kb = {torch.bfloat16: 2, torch.float32: 4}.get(k_cache.dtype)
    if lib is None or kb is None or v_cache.dtype != k_cache.dtype or not k_cache.is_contiguous():
        return None
    if not v_cache.is_contiguous() or slots.dtype != torch.int64 or q.device.type != "cpu":
        return None
    B, nh, hd = q.shape
    qf = q.to(torch.float32).contiguous()
    sl = slots.contiguous()
    ln = None if lens is None else lens.to(torch.int32).contiguous()
    out = torch.empty(B, nh, hd)
    ok = lib.cpu_decode_attn(
        qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kb, sl.data_ptr(),
        None if ln is None else ln.data_ptr(), B, nh, k_cache.shape[1], hd, sl.shape[1], scale,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out.to(q.dtype) if ok else None


def usable(w: torch.Tensor, rows: int) -> bool:
    """Whether `rows` rows times the CPU weight `w` ([N, K] or stacked [E, N, K]) take the C GEMV."""
    return (
        0 < rows <= GEMV_ROWS
        and w.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and w.is_contiguous()
        and library() is not None
    )


def gemv_bf16(
    w: torch.Tensor, x: torch.Tensor, ids: list[int] | None = None, shared: bool = True
) -> torch.Tensor:
    """w bf16 [N, K] (or stacked experts [E, N, K] with `ids`), x [M, K] (or [len(ids), M, K] when not
    `shared`) -> x W^T in f32: [M, N], or [len(ids), M, N] for the experts `ids` (each on the same x when
    `shared`, else on its own rows)."""
    stacked = w.dim() == 3
    N, K = w.shape[-2:]
    ids_t = torch.tensor(ids if stacked else [0], dtype=torch.int64)
    nb = len(ids_t)
    x = x.to(torch.float32).contiguous()
    M = x.shape[-2]
    ldx = 0 if shared or not stacked else M * K
    y = torch.empty(nb, M, N)
    library().cpu_gemv_bf16(
        w.data_ptr(), N, K, N * K if stacked else 0, ids_t.data_ptr(), nb,
        x.data_ptr(), ldx, M, y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return y if stacked else y[0]


class CPULinear(nn.Linear):
    """nn.Linear with the C GEMV for a few rows of a CPU input on a bf16 CPU weight (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 2 or not usable(self.weight, x.shape[0]):
            return F.linear(x, self.weight, self.bias)
        y = gemv_bf16(self.weight, x)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype)


def use_cpu_gemv_(model: nn.Module) -> int:
    """Turn every plain nn.Linear with a bf16 weight in CPU memory into a CPULinear (in place; the
    parameters stay as they are). Returns how many; 0 without the compiled kernel."""
    if library() is None:
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16:
            m.__class__ = CPULinear
            n += 1
    return n

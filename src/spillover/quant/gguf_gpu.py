"""GGUF Q4_0 / Q4_1 projections kept 4-bit on a GPU (the default mode of a GGUF: `--dtype auto`, no `--isq`).

The file's blocks (32 weights: an f16 scale d, for Q4_1 an f16 offset m, 16 bytes of 4-bit codes) are repacked
into ISQ's plain int4 layout (quant/formats.py: codes 2j / 2j+1 in the low / high nibble of a byte, one scale
and one zero per group of 32), which the GPU kernels of quant/kernels.py read: the GEMV for decode, a
dequantization into cuBLAS for prompts. Scales and zeros stay f16 (the kernels read either float type):
  Q4_0: w = d (q - 8)  -> scale d, zero 8: the file's weights exactly.
  Q4_1: w = d q + m    -> scale d, zero -m / d, rounded to f16 (a relative error of at most 2^-11 in the
                          offset term); a block with d = 0 holds m in all 32 weights, which this layout cannot
                          express, and becomes zeros (not seen in real files: quantizers give such blocks a
                          non-zero scale).
0.625 bytes per weight against the file's 0.5625 (Q4_0) or 0.625 (Q4_1). Other block types (Q8_0, k-quants)
are dequantized to the model dtype as before. The CPU keeps its own forms (quant/gguf_native.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from spillover.quant.formats import INT4_GROUP_SIZE
from spillover.quant.gguf_native import BLOCK_BYTES, native_parts
from spillover.quant.isq import Int4Linear

TYPES = ("q4_0", "q4_1")
"""The block types kept on a GPU."""


def plain_int4(parts: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_0 / Q4_1 rows (uint8 [rows, blocks * block bytes], stacked along the output) -> (codes uint8
    [out, in / 2], scale f16 [out, in / 32], zero f16 [out, in / 32]) on the CPU."""
    qs, scales, zeros = [], [], []
    for raw, qtype in parts:
        b = raw.numpy().reshape(raw.shape[0], -1, BLOCK_BYTES[qtype])  # [rows, blocks, bytes]
        d = b[..., :2].copy().view(np.float16)[..., 0]  # [rows, blocks]
        codes = np.concatenate([b[..., -16:] & 0x0F, b[..., -16:] >> 4], axis=-1)  # [rows, blocks, 32]
        codes = codes.reshape(len(b), -1)  # element order of the row
        qs.append(codes[:, 0::2] | (codes[:, 1::2] << 4))
        scales.append(d)
        if qtype == "q4_1":
            m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            df = d.astype(np.float32)
            z = np.divide(-m, df, out=np.zeros_like(m), where=df != 0)
            zeros.append(z.astype(np.float16))
        else:
            zeros.append(np.full(d.shape, 8, dtype=np.float16))
    return tuple(torch.from_numpy(np.ascontiguousarray(np.concatenate(a))) for a in (qs, scales, zeros))


def int4_linear(
    parts: list[tuple[torch.Tensor, str]], in_features: int, bias: Any, device: Any
) -> Int4Linear:
    """An Int4Linear (plain layout, on `device`) holding the file's Q4 weights."""
    q, scale, zero = plain_int4(parts)
    lin = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(lin)
    lin.dense, lin.cpu_kernel = None, False
    lin.qweight = nn.Parameter(q.to(device), requires_grad=False)
    lin.scale = nn.Parameter(scale.to(device), requires_grad=False)
    lin.zero = nn.Parameter(zero.to(device), requires_grad=False)
    lin.bias = bias
    lin.out_features, lin.in_features, lin.groups = q.shape[0], in_features, in_features // INT4_GROUP_SIZE
    return lin


def gpu_module(src: Any, name: str, sources: list[str], arch: Any, module: nn.Module, device: Any) -> Any:
    """The Int4Linear that computes projection `name` on `device` from the file's Q4 blocks, or None where
    the weight is dequantized as usual."""
    if src.kind != "gguf" or not name.startswith("layers.") or not isinstance(module, nn.Linear):
        return None
    if any(src.tensors[s].dtype not in TYPES for s in sources):
        return None
    parts = native_parts(src, sources, arch)
    if parts is None or any(q not in TYPES for _, q in parts):
        return None
    return int4_linear(parts, module.in_features, module.bias, device)  # a bias is set when it is loaded

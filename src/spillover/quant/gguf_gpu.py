"""GGUF projections kept quantized on a GPU (the default mode of a GGUF: `--dtype auto`, no `--isq`):
Q4_0 / Q4_1 / Q4_K as int4, Q5_0 / Q5_K / Q8_0 / Q6_K (and a fused projection that mixes them with Q4 types)
as int8, in ISQ's plain layouts (quant/formats.py), which the Triton kernels of quant/kernels.py read: the GEMV
for decode, a dequantization into cuBLAS for prompts.

Each of these block types is, per group of 32 weights, w = s q + o with integer codes q (Q4_K / Q5_K: blocks
of 256 weights in 8 sub-blocks of 32, each with 6-bit scale and min codes under the block's f16 d and dmin):
  Q4_0: s = d, o = -8 d          Q4_1: s = d, o = m              Q8_0: s = d, o = -128 d (codes q + 128)
  Q5_0: s = d, o = -16 d         Q4_K, Q5_K: s = d sc, o = -dmin mn (products in f32)
- int4 (codes 0..15, two a byte; w = (q - z) s; f16 s and z = -o / s): Q4_0 exactly; Q4_1 and Q4_K within
  the f16 rounding of z (and of s = d sc): relative errors of at most 2^-11 per term. 0.625 bytes per weight
  against the file's 0.5625 (Q4_0, Q4_K) or 0.625 (Q4_1). A group whose z exceeds f16's range (a tiny
  scale under a large offset: |o| > 65504 |s|, so its 32 weights lie within 15 |s| < 2.3e-4 |o| of o) takes
  z = +-65504 and s' = -o / z: each weight moves by at most 15 |s'| = 15 |o| / 65504 plus the f16 rounding
  of s' (2^-11 |o|), under a fifth of a bf16 step at o (tested). So the form, and the bytes the planner
  counts, follow from the types alone.
- int8 (codes 0..255; w = s q + o; f16 s and o): Q4_0, Q4_1, Q5_0, Q8_0 exactly, Q4_K and Q5_K within the
  f16 rounding of s and o. 1.125 bytes per weight against the file's 0.6875 (Q5_0, Q5_K) or 1.0625 (Q8_0),
  and 2 for the bf16 they were dequantized to before.
- Q6_K (w = d sc (q - 32), q 0..63, an int8 scale sc per 16 weights) has no exact int8 form in groups of 32:
  the two sub-blocks of a group share a grid only at the step d gcd(sc_a, sc_b), and codes spanning
  63 |sc| / gcd steps do not fit 256 (sc = 37 and 45: 2835 steps). So it is int8 in groups of 16 (s = d sc
  in f16: within f16's rounding of d sc); a projection fusing it with other types takes groups of 16
  throughout (their scales repeated, exact). The Triton int8 kernels take the group size from the shapes
  (`GS`, 32 otherwise).
- Symmetric int8: Q8_0, Q5_0, Q4_0 and Q6_K are w = d (q - z) with a fixed z (128, 16, 8, 32:
  formats.GGUF_ZERO_CODES), so o = -z s. An int8 projection whose parts are all of these holds codes
  c = q + 128 - z and no offsets (Int8Linear's `offset` None, o = -128 s implied; the kernels' constexpr
  `SYM`): Q8_0 at the file's 1.0625 bytes per weight, Q5_0 (and Q4_0 fused with them) 1.0625 against
  0.6875, Q6_K 1.125 against 0.82. Any Q4_1 / Q4_K / Q5_K part keeps the offsets (1.125, or 1.25 in groups
  of 16). Gemma 3 270M Q4_K_M on a GPU: 1.12x the file's tensor bytes (1.18x with the offsets).
A group whose scale is 0 holds its offset in all its weights: its codes become 0 (symmetric: 128) and its
scale 1.
Other types are dequantized to the model dtype, as are fused projections that mix them in. The CPU keeps its
own forms (quant/gguf_native.py).

The token embedding table and the output head of these types are kept too, as int8 whatever their type
(`table_module`): the head is an Int8Linear (its prompts dequantize it by chunks, not whole), the embedding a
`GPUEmbedding` over the same codes that dequantizes the rows a step looks up; a tied head and its embedding
share one copy. 1.0625 bytes a weight (Q8_0, Q5_0, Q4_0; 1.125 for Q6_K) or 1.125 (Q4_1, Q4_K, Q5_K)
against the 2 of bf16.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from spillover.quant.formats import (
    GGUF_GPU_TYPES,
    GGUF_ZERO_CODES,
    INT4_GROUP_SIZE,
    gguf_gpu_bits,
    gguf_gpu_table_nbytes,
    gguf_int8_group,
    gguf_int8_symmetric,
)
from spillover.quant.gguf_kernels import BLOCK_BYTES
from spillover.quant.gguf_native import native_parts
from spillover.quant.isq import Int4Linear, Int8Linear

TYPES = GGUF_GPU_TYPES
"""Block types kept on a GPU: int4 as above, else int8 (the planner counts the same: formats.py)."""
F16_MAX = 65504.0


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return b[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K blocks [rows, blocks, bytes] -> (s, o) f32 [rows, blocks, 8] (ggml's get_scale_min_k4)."""
    d, dmin, sc = _f16(b, 0), _f16(b, 2), b[..., 4:16]
    sc6 = np.concatenate([sc[..., 0:4] & 63, sc[..., 8:12] & 15 | (sc[..., 0:4] >> 6) << 4], axis=-1)
    mn6 = np.concatenate([sc[..., 4:8] & 63, sc[..., 8:12] >> 4 | (sc[..., 4:8] >> 6) << 4], axis=-1)
    return d[..., None] * sc6.astype(np.float32), -dmin[..., None] * mn6.astype(np.float32)


def groups(raw: torch.Tensor, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows of blocks (uint8 [rows, blocks * block bytes]) -> (codes uint8 [rows, in] in element order,
    s and o f32 [rows, in / 32]) with w = s q + o per group of 32 (Q6_K: [rows, in / 16], groups of 16)."""
    rows = raw.shape[0]
    b = raw.numpy().reshape(rows, -1, BLOCK_BYTES[qtype])  # [rows, blocks, bytes]
    if qtype == "q6_k":  # 2 halves of 128: ql 64 bytes, qh 32 each; then 16 int8 scales, f16 d (ggml's order)
        ql = b[..., :128].reshape(rows, -1, 2, 1, 64)
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32)
        lo = np.concatenate(
            [ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], 3
        )
        hi = (qh >> np.arange(0, 8, 2, dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3  # [rows, blocks, 2, 4, 32]
        s = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)  # [rows, blocks, 16]
        return (lo | hi << 4).reshape(rows, -1), s.reshape(rows, -1), -32 * s.reshape(rows, -1)
    if qtype in ("q4_k", "q5_k"):
        s, o = _k_scales(b)
        qs = b[..., -128:].reshape(rows, -1, 4, 1, 32)  # 4 chunks of 64 weights: low nibbles, then high
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=3)  # [rows, blocks, 4, 2, 32]
        if qtype == "q5_k":  # the fifth bit of sub-block j (= 2 chunk + nibble) is bit j of qh[l]
            qh = b[..., 16:48].reshape(rows, -1, 1, 1, 32)
            bit = np.arange(8, dtype=np.uint8).reshape(1, 1, 4, 2, 1)
            codes = codes | ((qh >> bit) & 1) << 4
        return codes.reshape(rows, -1), s.reshape(rows, -1), o.reshape(rows, -1)
    s = _f16(b, 0)
    if qtype == "q8_0":
        return (
            (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(rows, -1),
            s,
            -128 * s,
        )
    qs = b[..., -16:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [rows, blocks, 32]: elements 0-15, then 16-31
    if qtype == "q5_0":  # bit i of the 32-bit qh is element i's fifth bit
        qh = b[..., 2:6].copy().view("<u4")  # [rows, blocks, 1]
        codes = codes | (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        return codes.reshape(rows, -1), s, -16 * s
    return codes.reshape(rows, -1), s, _f16(b, 2) if qtype == "q4_1" else -8 * s


def _stacked(
    parts: list[tuple[torch.Tensor, str]], sym: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The parts' groups stacked along the output (in groups of 16 where a part is Q6_K: the others' scales and
    offsets repeated); a group of scale 0 (all its weights o): codes 0, scale 1. `sym` (int8, every part
    symmetric): codes q + 128 - z (z: `GGUF_ZERO_CODES`), so w = s (c - 128) (a group of scale 0: codes 128)."""
    gs = gguf_int8_group([q for _, q in parts])
    split = []
    for r, q in parts:
        c, *so = groups(r, q)
        c = c + np.uint8(128 - GGUF_ZERO_CODES[q]) if sym else c
        split.append((c, *(np.repeat(a, c.shape[1] // a.shape[1] // gs, axis=1) for a in so)))
    codes, s, o = (np.concatenate(a) for a in zip(*split, strict=True))
    flat = s == 0
    codes.reshape(*s.shape, gs)[flat] = 128 if sym else 0
    return codes, np.where(flat, np.float32(1), s), o


def _param(a: np.ndarray, device: Any) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)).to(device), requires_grad=False)


def int4_linear(
    parts: list[tuple[torch.Tensor, str]], in_features: int, bias: Any, device: Any
) -> Int4Linear:
    """An Int4Linear (plain layout, f16 scales and zeros, on `device`) holding Q4_0 / Q4_1 / Q4_K parts (a
    zero -o / s beyond f16's range clamped to it, the scale widened to match: see the module doc)."""
    codes, s, o = _stacked(parts)
    z = -o / s
    big = ~(np.abs(z) <= F16_MAX)
    if big.any():
        z = np.clip(z, -F16_MAX, F16_MAX)
        s = np.where(big, -o / z, s)
    lin = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(lin)
    lin.dense, lin.cpu_kernel = None, False
    lin.qweight = _param(codes[:, 0::2] | (codes[:, 1::2] << 4), device)  # element 2j low, 2j+1 high
    lin.scale = _param(s.astype(np.float16), device)
    lin.zero = _param(z.astype(np.float16), device)
    lin.bias = bias
    lin.out_features, lin.in_features, lin.groups = len(codes), in_features, in_features // INT4_GROUP_SIZE
    return lin


def int8_linear(
    parts: list[tuple[torch.Tensor, str]], in_features: int, bias: Any, device: Any
) -> Int8Linear:
    """An Int8Linear (plain layout, on `device`) holding parts of any of `TYPES`; symmetric (no offsets) where
    every part is (`gguf_int8_symmetric`)."""
    sym = gguf_int8_symmetric([q for _, q in parts])
    codes, s, o = _stacked(parts, sym)
    lin = Int8Linear.__new__(Int8Linear)
    nn.Module.__init__(lin)
    lin.blocks = False
    lin.qweight = _param(codes, device)
    lin.scale = _param(s.astype(np.float16), device)
    lin.register_parameter("offset", None if sym else _param(o.astype(np.float16), device))
    lin.bias = bias
    lin.out_features, lin.in_features, lin.groups = len(codes), in_features, s.shape[1]
    return lin


class GPUEmbedding(nn.Module):
    """Token embeddings looked up in an int8 table (an Int8Linear's codes, scales and offsets: the tied head's
    own); only the rows a step needs are dequantized, each weight s q + o in f32, rounded once."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        # what code reading `embed_tokens.weight` needs (dtype, device); the rows are in `table`
        self.register_buffer(
            "weight", torch.empty(0, dtype=dtype, device=table.qweight.device), persistent=False
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        t, flat = self.table, ids.reshape(-1)
        q = t.qweight.index_select(0, flat).view(len(flat), t.groups, -1)  # [T, G, gs] codes 0..255
        s = t.scale.index_select(0, flat).float()[..., None]
        if t.offset is None:  # symmetric: w = s (q - 128)
            return ((q.float() - 128) * s).view(*ids.shape, -1).to(self.weight.dtype)
        o = t.offset.index_select(0, flat).float()[..., None]
        return (q.float() * s + o).view(*ids.shape, -1).to(self.weight.dtype)


def table_module(
    src: Any, sources: list[str], module: nn.Module, device: Any, tables: dict[tuple[str, str], Int8Linear]
) -> Any:
    """The token embedding (`GPUEmbedding`) or output head (Int8Linear) of a GGUF kept as int8 on `device`,
    or None where it is dequantized as usual (a type not kept, a row length off its groups). `tables`: the
    loader's tables by (source, device), so a tied head and its embedding share one."""
    if len(sources) != 1 or src.tensors[sources[0]].dtype not in TYPES:
        return None
    info = src.tensors[sources[0]]
    if gguf_gpu_table_nbytes(tuple(info.shape), info.dtype) is None:
        return None
    key = (sources[0], str(device))
    lin = tables.get(key)
    if lin is None:
        data, qtype = src.raw(sources[0])
        lin = tables[key] = int8_linear([(data.view(info.shape[0], -1), qtype)], info.shape[1], None, device)
    if isinstance(module, nn.Embedding):
        return GPUEmbedding(lin, module.weight.dtype)
    return lin


kept_bits = gguf_gpu_bits
"""The width a projection of these block types is kept in on a GPU (4, 8, or None: dequantized)."""


def gpu_module(
    src: Any,
    name: str,
    sources: list[str],
    arch: Any,
    module: nn.Module,
    device: Any,
    tables: dict[tuple[str, str], Int8Linear] | None = None,
) -> Any:
    """The Int4Linear / Int8Linear that computes projection `name` on `device` from the file's blocks (the
    embedding and head: `table_module`, sharing `tables`), or None where the weight is dequantized as usual."""
    if src.kind != "gguf" or not name.endswith(".weight"):
        return None
    if isinstance(module, nn.Embedding) or (
        isinstance(module, nn.Linear) and module.bias is None and arch.stage_of(name) == "head"
    ):
        return table_module(src, sources, module, device, {} if tables is None else tables)
    if not name.startswith("layers.") or not isinstance(module, nn.Linear):
        return None
    if kept_bits([src.tensors[s].dtype for s in sources]) is None:
        return None
    parts = native_parts(src, sources, arch, TYPES)
    if parts is None:
        return None
    if kept_bits([q for _, q in parts]) == 4:  # (a bias is set when it is loaded)
        return int4_linear(parts, module.in_features, module.bias, device)
    return int8_linear(parts, module.in_features, module.bias, device)

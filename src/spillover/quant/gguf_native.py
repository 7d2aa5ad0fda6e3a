"""GGUF weights kept as the file has them, for CPU-resident stages (the default mode of a GGUF on the CPU).

With the C kernels of quant/gguf_cpu.c (built on first use, quant/gguf_kernels.py):
- Q4_0 / Q4_1 / Q8_0 projections and a head of such blocks -> `GGUFLinear`: the file's rows as they are
  (a tied head shares the embedding's map; fused q/k/v and gate/up are the parts' rows stacked, a Q4_0 part
  fused with Q4_1 ones rewritten as Q4_1 exactly). Activations keep 15-16 significant bits (bf16 hi + lo
  parts, or int16 per block of 32), scales and accumulation are f32 (SmolLM2: 99.84% top-1 agreement with
  `--dtype f32`), from 0.56-1.06 bytes per weight. Decode rows take the block GEMVs; prompts a GEMM of the
  codes (Q5_K prompts dequantize 16 MiB of weights at a time into torch's f32 GEMM).
- Llama-style and Gemma 3 layers whose projections are all `GGUFLinear` run decode steps as one C call per
  layer (`CPUDecodeLayer`: norms, rope, KV write, attention, the activation, residuals and the GEMVs), and
  prompt rows as two C calls around the attention (C for fresh prompts, else torch's SDPA).
Without them (no C compiler): Q4_0 / Q4_1 projections -> `GGUFInt4Linear` (torch's int4 CPU kernel: codes
repacked losslessly, scales and activations rounded to bf16, bf16 outputs: 97% top-1 agreement), the head ->
`Int8Head` (int8 rows, one scale each).
- Either way Q8_0 (or Q4_x) token embeddings -> `GGUFEmbedding`: the looked-up rows are dequantized from the
  file's blocks (exact, f32), the table itself stays in the file's memory map (no copy).

Everything else (norms, attention, the residual stream, the KV cache) stays in the model dtype (f32 on CPU).
`--dtype f32` (or bf16/f16) dequantizes every tensor at load instead: the exact reference.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from spillover.layers.norm import RMSNorm
from spillover.quant import gguf_kernels
from spillover.quant.formats import GGUF_BLOCKS, GGUF_CPU_INT4_TYPES, GGUF_ROW_TILE

BLOCK = 32
"""Weights per GGUF block (Q4_0, Q4_1, Q8_0)."""
INT4_TYPES = GGUF_CPU_INT4_TYPES
"""Storage types a projection keeps without the C kernels (through torch's int4 CPU kernel)."""
BLOCK_BYTES = {t: GGUF_BLOCKS[t][1] for t in (*INT4_TYPES, "q8_0")}
"""Bytes per block of the types kept without the C kernels: f16 scale (+ f16 min for Q4_1) + the codes."""
GEMM_TYPES = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k")
"""Storage types the prompt GEMM of gguf_cpu.c multiplies (`gguf_kernels.gemm`; Q5_K prompts dequantize)."""
CHUNK_ROWS = 1024
"""Rows of the head requantized at a time (a few f32 copies of one chunk are the transients)."""
CHUNK_WEIGHTS = 4 << 20
"""Weights a prompt's GEMM dequantizes at a time (16 MiB of f32)."""


def _blocks(raw: torch.Tensor, qtype: str, rows: int) -> torch.Tensor:
    return raw.reshape(rows, -1, BLOCK_BYTES[qtype])  # [rows, blocks, bytes]


def _scale(b: torch.Tensor, at: int = 0) -> torch.Tensor:
    return b[..., at : at + 2].contiguous().view(torch.float16)[..., 0].float()  # [rows, blocks]


def _codes_q4(b: torch.Tensor) -> torch.Tensor:
    """Q4 blocks -> codes 0..15 [rows, blocks * 32] (low nibbles: elements 0-15, high: 16-31)."""
    qs = b[..., -16:]
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(b.shape[0], -1)


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [rows, blocks, 34] -> f32 [rows, blocks * 32] (exact)."""
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return (q * _scale(b)[..., None]).reshape(b.shape[0], -1)


def dequantize_rows(raw: torch.Tensor, qtype: str, rows: int) -> torch.Tensor:
    """Blocks of Q4_0 / Q4_1 / Q8_0 rows -> f32 [rows, in]."""
    b = _blocks(raw, qtype, rows)
    if qtype == "q8_0":
        return dequantize_q8_0(b)
    d = _scale(b)
    m = _scale(b, 2) if qtype == "q4_1" else -8.0 * d
    q = _codes_q4(b).float().view(rows, -1, BLOCK)
    return (q * d[..., None] + m[..., None]).reshape(rows, -1)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Codes 0..15 [N, K] -> the layout of torch's int4 CPU kernel (`_convert_weight_to_int4pack_for_cpu`,
    AVX-512: tiles of 64 rows; per tile and input k, 32 bytes: row j in the low nibble, row 32 + j in the
    high one), in numpy (that op takes int32 codes: 4 bytes per weight of transients and 10x the time).
    Row counts that are not a multiple of 64 go through torch's op."""
    N, K = codes.shape
    if N % 64 or not _layout_known():
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes).int(), 1).numpy()
    return _pack64(codes)


def _pack64(codes: np.ndarray) -> np.ndarray:
    N, K = codes.shape
    t = codes.reshape(N // 64, 2, 32, K).transpose(0, 3, 1, 2)  # [tiles, K, 2, 32]
    return (t[:, :, 0] | (t[:, :, 1] << 4)).reshape(N, K // 2)


def _layout_known() -> bool:
    """Whether this torch build packs whole 64-row tiles as `_pack64` does: AVX-512's interleaved layout, found
    once by quant/isq.py's probe (the same one that reads these bytes back on a GPU)."""
    from spillover.quant.isq import cpu_int4_interleaved

    return cpu_int4_interleaved(128) is True


class GGUFLinear(nn.Module):
    """y = x W^T (+ b) with W as the file's rows of GGUF blocks (`gguf_kernels.TYPES`), through
    quant/gguf_cpu.c (f32 in and out; activations to 15-16 significant bits, f32 scales and accumulation).
    Up to `GEMV_ROWS` input rows (decode) take the block GEMV; more rows (prompts) the Q4 GEMM, or the weight
    dequantized to f32 in chunks for torch's GEMM. Fused projections whose parts differ in type (Gemma's
    Q5_0 q/k with a Q8_0 v) keep one array per run of one type."""

    def __init__(self, parts: list[tuple[torch.Tensor, str]], in_features: int, bias: Any = None) -> None:
        """parts: (raw [rows, in / block size * block bytes] uint8, type) stacked along the output, kept as
        given (pass copies, or the file's map)."""
        super().__init__()
        self.qweights = nn.ParameterList(nn.Parameter(r, requires_grad=False) for r, _ in parts)
        self.qtypes = [q for _, q in parts]
        self.bias = bias
        self.in_features, self.out_features = in_features, sum(r.shape[0] for r, _ in parts)
        self.chunk = max(16, (CHUNK_WEIGHTS // in_features) // 16 * 16)  # rows dequantized at a time

    @property
    def qweight(self) -> torch.Tensor:  # the one array of a single-part projection
        return self.qweights[0]

    @property
    def qtype(self) -> str:
        return self.qtypes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        ys = [self._part(x2, w, q) for w, q in zip(self.qweights, self.qtypes, strict=True)]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def _part(self, x2: torch.Tensor, w: torch.Tensor, qtype: str) -> torch.Tensor:
        if x2.device.type != "cpu":  # a CPU layer streamed to a GPU for a long prompt (engine/offload.py):
            y = torch.empty(len(x2), len(w), device=x2.device)  # the blocks dequantized on the CPU, by chunks
            for a in range(0, len(w), self.chunk):
                wf = gguf_kernels.dequant(w[a : a + self.chunk].cpu(), qtype, self.in_features)
                torch.mm(x2, wf.to(x2.device).T, out=y[:, a : a + len(wf)])
            return y
        if len(x2) <= gguf_kernels.GEMV_ROWS:
            return gguf_kernels.gemv(w, qtype, x2)
        y = torch.empty(len(x2), len(w))
        if gguf_kernels.gemm(w, qtype, x2, y):
            return y
        for a in range(0, len(w), self.chunk):  # (gemm wrote nothing: y is free)
            wf = gguf_kernels.dequant(w[a : a + self.chunk], qtype, self.in_features)
            torch.mm(x2, wf.T, out=y[:, a : a + len(wf)])
        return y

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] (tests only)."""
        ws = [
            gguf_kernels.dequant(w, q, self.in_features)
            for w, q in zip(self.qweights, self.qtypes, strict=True)
        ]
        return torch.cat(ws).to(dtype)


def _as_q4_1(raw: np.ndarray, rows: int) -> np.ndarray:
    """Q4_0 rows -> the same weights as Q4_1 rows (m = -8 d, exact in f16): to fuse a Q4_0 part with Q4_1."""
    b = raw.reshape(rows, -1, BLOCK_BYTES["q4_0"])
    d = b[..., :2].copy().view(np.float16)
    out = np.empty((*b.shape[:2], BLOCK_BYTES["q4_1"]), dtype=np.uint8)
    out[..., :2], out[..., 2:4], out[..., 4:] = b[..., :2], (d * np.float16(-8)).view(np.uint8), b[..., 2:]
    return out.reshape(rows, -1)


def fused_raw(parts: list[tuple[torch.Tensor, str]]) -> list[tuple[torch.Tensor, str]]:
    """Parts (raw rows, type) copied out of the file, stacked along the output into one array where their
    types allow (one type, or Q4_0 with Q4_1), else one array per run of parts of one type."""
    types = {q for _, q in parts}
    if len(types) > 1 and types != {"q4_0", "q4_1"}:  # runs of one type stacked (Gemma: q, k | v)
        runs: list[tuple[list[np.ndarray], str]] = []
        for r, q in parts:
            if runs and runs[-1][1] == q:
                runs[-1][0].append(r.numpy())
            else:
                runs.append(([r.numpy()], q))
        return [(torch.from_numpy(np.concatenate(rs) if len(rs) > 1 else rs[0].copy()), q) for rs, q in runs]
    qtype = types.pop() if len(types) == 1 else "q4_1"
    rows = [r.numpy() if q == qtype else _as_q4_1(r.numpy(), r.shape[0]) for r, q in parts]
    stacked = np.concatenate(rows) if len(rows) > 1 else np.ascontiguousarray(rows[0]).copy()
    return [(torch.from_numpy(stacked), qtype)]


class GGUFInt4Linear(nn.Module):
    """y = x W^T (+ b) with W from Q4_0 / Q4_1 blocks, through torch's int4 CPU kernel (see the module doc)."""

    def __init__(self, parts: list[tuple[torch.Tensor, str]], in_features: int, bias: Any = None) -> None:
        """parts: (raw block bytes [rows, blocks * block bytes] uint8, storage type) stacked along the output."""
        super().__init__()
        out = sum(p.shape[0] for p, _ in parts)
        codes = np.empty((out, in_features), dtype=np.uint8)
        sz = torch.empty(in_features // BLOCK, out, 2, dtype=torch.bfloat16)  # (scale, value at code 8)
        r0 = 0
        for raw, qtype in parts:
            b = raw.numpy().reshape(raw.shape[0], -1, BLOCK_BYTES[qtype])  # [rows, blocks, bytes]
            n, qs = b.shape[0], b[..., -16:]
            c = codes[r0 : r0 + n].reshape(n, -1, BLOCK)
            np.bitwise_and(qs, 0x0F, out=c[..., :16])  # elements 0-15: low nibbles; 16-31: high
            np.right_shift(qs, 4, out=c[..., 16:])
            d = torch.from_numpy(b[..., :2].copy().view(np.float16)[..., 0]).float()  # [rows, blocks]
            m = (
                torch.from_numpy(b[..., 2:4].copy().view(np.float16)[..., 0]).float()
                if qtype == "q4_1"
                else -8 * d
            )
            # kernel: w = (q - 8) * scale + zero; file: w = q * d + m  ->  scale = d, zero = m + 8 d
            sz[:, r0 : r0 + n] = torch.stack([d, m + 8.0 * d], dim=-1).transpose(0, 1)
            r0 += n
        self.qweight = nn.Parameter(torch.from_numpy(pack_int4(codes)), requires_grad=False)
        self.scales_zeros = nn.Parameter(sz, requires_grad=False)
        self.bias = bias
        self.in_features, self.out_features = in_features, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # a CPU layer streamed to a GPU for a long prompt (engine/offload.py)
            from spillover.quant.isq import unpack_cpu_int4

            w = unpack_cpu_int4(self.qweight, self.scales_zeros, self.in_features, x.dtype)
            return torch.nn.functional.linear(x, w, self.bias)
        shape = x.shape
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, BLOCK, self.scales_zeros)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] through the kernel itself (W^T = I W^T; tests only)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, BLOCK, self.scales_zeros)
        return wt.T.to(dtype)


class GGUFEmbedding(nn.Module):
    """Token embeddings looked up in the file's blocks; only the rows a step needs are dequantized."""

    def __init__(self, raw: torch.Tensor, qtype: str, num: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.raw, self.qtype, self.num, self.dim = raw, qtype, num, dim
        # what code reading `embed_tokens.weight` needs (dtype, device); the table is `raw`
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        rows = self.raw.index_select(0, ids.reshape(-1))
        if gguf_kernels.library() is not None and self.qtype in gguf_kernels.TYPES:
            out = gguf_kernels.dequant(rows, self.qtype, self.dim)
        else:
            out = dequantize_rows(rows, self.qtype, rows.shape[0])
        return out.to(self.weight.dtype).view(*ids.shape, self.dim)


class Int8Head(nn.Module):
    """The output projection as int8 rows with one bf16 scale each, through torch's int8 CPU kernel
    (`_weight_int8pack_mm`: 1 byte per weight). A requantization: the file's blocks (Q8_0: one scale per 32
    weights) become one scale per row, because torch has no CPU kernel for per-block int8 scales."""

    def __init__(self, raw: torch.Tensor, qtype: str, rows: int) -> None:  # raw: [rows, row bytes]
        super().__init__()
        q = torch.empty(rows, raw.shape[1] // BLOCK_BYTES[qtype] * BLOCK, dtype=torch.int8)
        scale = torch.empty(rows, dtype=torch.bfloat16)
        for a in range(0, rows, CHUNK_ROWS):
            w = dequantize_rows(raw[a : a + CHUNK_ROWS], qtype, min(CHUNK_ROWS, rows - a))  # f32, exact
            s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
            q[a : a + len(w)] = (w / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            scale[a : a + len(w)] = s
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out] f32
        """x as hi + lo, two bf16 rows each (16 bits of mantissa: the head decides the token, and SmolLM2's
        first answer token is a near-tie that a plain bf16 input flips); a second row is nearly free in a
        memory-bound GEMV."""
        hi = x.to(torch.bfloat16)
        xx = torch.cat([hi, (x.float() - hi.float()).to(torch.bfloat16)])
        y = torch.ops.aten._weight_int8pack_mm(xx, self.qweight, self.scale).float()
        return y[: len(x)] + y[len(x) :]


class CPUDecodeLayer:
    """A Llama-style or Gemma 3 decoder layer whose projections are all `GGUFLinear`, run for decode steps by
    one call of gguf_cpu.c (`gguf_llama_decode`: norms, q/k norms, rope, the KV write, attention over the
    paged cache, SiLU or GELU-tanh and the residual adds between the block GEMVs, in f32, in one OpenMP
    region): the ~70 torch ops of a layer cost ~5 us each, as much as its weights. Prompt rows take two C calls
    around the attention (`_prefill`) where the prompt GEMM reads every projection's type; anything else the
    module's torch path."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        a = self.args = gguf_kernels.LayerArgs()
        a.H, a.nh, a.nkv, a.hd, a.I = attn.o_proj.out_features, attn.n_heads, attn.n_kv, attn.hd, mlp.inter
        a.eps, a.scale, a.act = layer.input_layernorm.eps, attn.scale, int(mlp.act == "gelu_tanh")
        norms = _norms(layer)
        self.keep = [n.weight for n in norms if n is not None]
        a.ln1, a.ln2, a.lnpa, a.lnpf, a.qn, a.kn = (None if n is None else n.weight.data_ptr() for n in norms)
        bias = attn.qkv_proj.bias
        if bias is not None:
            self.keep.append(bias)
        a.bqkv = None if bias is None else bias.data_ptr()
        for n, lin in (("o", attn.o_proj), ("gu", mlp.gate_up_proj), ("d", mlp.down_proj)):
            setattr(a, "w" + n, lin.qweight.data_ptr())
            setattr(a, "t" + n, gguf_kernels.TYPES[lin.qtype])
        qkv = attn.qkv_proj
        a.wqkv, a.tqkv = qkv.qweights[0].data_ptr(), gguf_kernels.TYPES[qkv.qtypes[0]]
        if len(qkv.qtypes) == 2:  # Gemma: Q5_0 q/k rows, Q8_0 v rows
            a.nqkv1 = qkv.qweights[0].shape[0]
            a.wqkv2, a.tqkv2 = qkv.qweights[1].data_ptr(), gguf_kernels.TYPES[qkv.qtypes[1]]
        self.caches: tuple[Any, Any] = (None, None)  # the KV cache tensors last checked
        self.prefill_ok = gguf_kernels.gemm_ok() and all(  # the prompt calls' GEMM reads these types
            q in GEMM_TYPES for lin in (qkv, attn.o_proj, mlp.gate_up_proj, mlp.down_proj) for q in lin.qtypes
        )

    @staticmethod
    def build(layer: nn.Module) -> CPUDecodeLayer | None:
        """The fused layer, or None where the layer is not one it computes exactly."""
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:  # (GGUFLinear projections imply the library is built)
            return None
        lins = (
            attn.qkv_proj,
            attn.o_proj,
            getattr(mlp, "gate_up_proj", None),
            getattr(mlp, "down_proj", None),
        )
        norms = [n for n in _norms(layer) if n is not None]
        if (
            not all(isinstance(m, GGUFLinear) for m in lins)
            or any(len(m.qtypes) != 1 for m in lins[1:])
            or len(lins[0].qtypes) > 2
            or any(m.bias is not None for m in lins[1:])
            or mlp.act not in ("silu", "gelu_tanh")
            or any(
                type(n).forward is not RMSNorm.forward
                or n.weight.dtype != torch.float32
                or n.eps != layer.input_layernorm.eps
                for n in norms
            )
            or (attn.qkv_proj.bias is not None and attn.qkv_proj.bias.dtype != torch.float32)
        ):
            return None
        return CPUDecodeLayer(layer)

    def __call__(self, x: torch.Tensor, li: Any) -> torch.Tensor | None:
        """x [T, H] after the layer, or None when this step is not one the kernel runs (prompt rows, other
        dtypes, ...): the caller then runs the torch path."""
        m, a, cos, sin = li.meta, self.args, li.cos, li.sin
        prefill = bool(m.prefills)
        if x.dtype != torch.float32 or (
            (not self.prefill_ok or len(x) <= gguf_kernels.GEMV_ROWS or m.reads_before_write)
            if prefill
            else (m.decode_rows is None or not m.all_decode_rows_contiguous)
        ):
            return None
        if li.k_cache is not self.caches[0]:  # the same cache tensors every step: checked once
            kc, vc = li.k_cache, li.v_cache
            if not (kc.dtype == vc.dtype == torch.float32 and kc.is_contiguous() and vc.is_contiguous()):
                return None
            self.caches, a.kc, a.vc = (kc, vc), kc.data_ptr(), vc.data_ptr()
        if (
            cos.dtype != torch.float32
            or not (cos.is_contiguous() and sin.is_contiguous())
            or cos.shape != (len(x), cos.shape[-1])
            or cos.shape[-1] > a.hd
            or len(x) != len(m.slot_mapping)
        ):
            return None
        if prefill:
            return self._prefill(x, li)
        slots = m.decode_slots
        a.T, a.L, a.rot = x.shape[0], slots.shape[1], cos.shape[-1]
        a.cos, a.sin, a.slot, a.dec_slots = (
            cos.data_ptr(),
            sin.data_ptr(),
            m.slot_mapping.data_ptr(),
            slots.data_ptr(),
        )
        a.lens = None if m.decode_mask is None else m.decode_lens.data_ptr()
        y = x.contiguous().clone()
        gguf_kernels.decode_layer(a, y)
        return y

    def _prefill(self, x: torch.Tensor, li: Any) -> torch.Tensor | None:
        """Prompt rows (with any decode rows of the step): the C calls around torch's attention."""
        from spillover.layers.attention import paged_attention

        m, a, T = li.meta, self.args, len(x)
        a.T, a.rot = T, li.cos.shape[-1]
        a.cos, a.sin, a.slot = li.cos.data_ptr(), li.sin.data_ptr(), m.slot_mapping.data_ptr()
        nq, nkv = a.nh * a.hd, a.nkv * a.hd

        def attend(qkv: torch.Tensor) -> torch.Tensor:  # q, k roped; k, v already in the cache
            if m.decode_rows is None and all(p.slots is None and p.mask is None for p in m.prefills):
                out = torch.empty(T, nq)  # fresh prompts only: the C kernel over each one's own rows
                if all(gguf_kernels.attn_causal(qkv, p.start, p.q_len, a, out) for p in m.prefills):
                    return out
            q = qkv[:, :nq].view(T, a.nh, a.hd)
            k, v = (qkv[:, nq + i * nkv : nq + (i + 1) * nkv].view(T, a.nkv, a.hd) for i in (0, 1))
            o = paged_attention(q, k, v, li.k_cache, li.v_cache, m, a.scale, kv_written=True)
            return o.reshape(T, nq)

        y = x.contiguous().clone()
        return y if gguf_kernels.prefill_layer(a, y, attend, getattr(li, "out_rows", None)) else None


def _norms(layer: nn.Module) -> list[Any]:
    """A layer's norms as gguf_cpu.c's Layer takes them (ln1, ln2, lnpa, lnpf, qn, kn): input, pre-MLP, (Gemma 3)
    the norms of the attention and MLP outputs before their residual adds, and the per-head q / k norms; None
    where the layer has none."""
    attn = layer.self_attn
    qk = [attn.q_norm, attn.k_norm] if attn.qk_norm else [None, None]
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3
        return [
            layer.input_layernorm,
            layer.pre_feedforward_layernorm,
            layer.post_attention_layernorm,
            layer.post_feedforward_layernorm,
            *qk,
        ]
    return [layer.input_layernorm, layer.post_attention_layernorm, None, None, *qk]


NATIVE_MODULES = (GGUFLinear, GGUFInt4Linear, GGUFEmbedding, Int8Head)
"""The modules that hold a GGUF's blocks (or the head requantized from them) instead of dequantized weights."""


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps freed chunks below its adaptive mmap threshold, up
    to 32 MiB each: the transients of repacking would otherwise stay in the process's RSS)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc (not find_library: it runs ldconfig)
    except (OSError, AttributeError):
        return None


def native_parts(
    src: Any, sources: list[str], arch: Any, types: Any = None
) -> list[tuple[torch.Tensor, str]] | None:
    """The raw blocks of `sources` (HF names) when all of them are stored in a type kept natively (`types`;
    default: those this CPU's kernels take), with the architecture's GGUF row order undone (llama.cpp's q/k
    permutation); None otherwise."""
    infos = [src.tensors[s] for s in sources]
    kept = types or (gguf_kernels.TYPES if gguf_kernels.library() is not None else INT4_TYPES)
    if (
        src.kind != "gguf"
        or any(t.dtype not in kept or t.shape[-1] % gguf_kernels.BLOCK_SIZE[t.dtype] for t in infos)
        or sum(t.shape[0] for t in infos) % GGUF_ROW_TILE  # torch's int4 kernel takes rows in tiles of 16
    ):
        return None
    parts = []
    for s in sources:
        data, qtype = src.raw(s)
        rows = data.view(src.tensors[s].shape[0], -1)
        w = arch.from_gguf(s, rows.numpy(), src.config)  # (a numpy permutation copies on one thread)
        parts.append((rows if np.may_share_memory(w, rows.numpy()) else torch.from_numpy(w), qtype))
    return parts


def native_module(src: Any, name: str, sources: list[str], arch: Any, module: nn.Module, dtype: Any) -> Any:
    """The module that computes parameter `name` (of `module`) from the file's blocks, or None where the
    weight is dequantized as usual: int4 projections, quantized embeddings and the head they tie to.
    (`from_gguf` value conventions are applied to projections; embeddings and heads have none.)"""
    if src.kind != "gguf" or not name.endswith(".weight"):
        return None
    if isinstance(module, nn.Linear) and name.startswith("layers."):
        parts = native_parts(src, sources, arch)
        if parts is None:
            return None
        if gguf_kernels.library() is None:
            if any(q not in INT4_TYPES for _, q in parts):
                return None
            return GGUFInt4Linear(parts, module.in_features, module.bias)
        return GGUFLinear(fused_raw(parts), module.in_features, module.bias)
    kept = gguf_kernels.TYPES if gguf_kernels.library() is not None else BLOCK_BYTES
    if len(sources) != 1 or src.tensors[sources[0]].dtype not in kept:
        return None
    info = src.tensors[sources[0]]
    if len(info.shape) != 2 or info.shape[1] % gguf_kernels.BLOCK_SIZE.get(info.dtype, BLOCK):
        return None
    data, qtype = src.raw(sources[0])
    data = data.view(info.shape[0], -1)
    if isinstance(module, nn.Embedding):
        return GGUFEmbedding(data, qtype, info.shape[0], info.shape[1], dtype)
    if isinstance(module, nn.Linear) and module.bias is None and arch.stage_of(name) == "head":
        if gguf_kernels.library() is not None:  # the file's rows as they are (a tied head shares the map)
            return GGUFLinear([(data, qtype)], info.shape[1])
        return Int8Head(data, qtype, info.shape[0])
    return None

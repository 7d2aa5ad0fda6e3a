"""In-situ quantization (ISQ): swap a layer's nn.Linear projections for quantized ones, right after that
layer's weights are loaded (so at most one layer exists at full precision beside the quantized model).

Formats and their bytes are defined in `quant/formats.py` (the planner counts the same tensors):
- 8 bits: int8 codes, f16 scale and offset per group of 32 inputs (w = d q + m). On a CPU the rows are
  Q8_0 blocks multiplied exactly in f32 by the C kernels of quant/gguf_cpu.c, plus the offsets' term
  (without a C compiler: row chunks dequantized into a GEMM). On CUDA: a Triton GEMV for decode-sized inputs (quant/kernels.py), row
  chunks dequantized into cuBLAS for prompts.
- 4 bits: int4 in groups of 32 with bf16 scale and zero. On CPU: torch's int4 kernel for decode-sized inputs
  and, when the map streams nothing to a GPU, a dense bf16 copy for prompts (quant/formats.py says why). On
  CUDA: a Triton GEMV for decode-sized inputs, a Triton dequantization into cuBLAS for prompts. A CPU layer
  streamed to a GPU for a long prompt (engine/offload.py) moves only its CPU-kernel bytes, which
  `unpack_cpu_int4` dequantizes there. Other devices dequantize per call.

Quantizing runs in row chunks (`QUANT_CHUNK_ELEMENTS`), so its transients stay small next to the weight itself
(the planner counts them: placement/estimate.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from spillover.quant import gguf_kernels, kernels
from spillover.quant.formats import (
    CPU_INT4_DENSE_COPY,
    DEQUANT_CHUNK_ELEMENTS,
    INT4_GROUP_SIZE,
    INT4_KERNEL_MAX_ROWS,
    INT8_GROUP_SIZE,
    Q8_0_BLOCK_BYTES,
    QUANT_CHUNK_ELEMENTS,
    UNPACK_CHUNK_ELEMENTS,
    quantized_nbytes,
)
from spillover.quant.gguf_native import CHUNK_WEIGHTS


def _rows(w: torch.Tensor, work: torch.device | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start row, f32 chunk of `w` on the work device), QUANT_CHUNK_ELEMENTS weights at a time."""
    rows = max(1, QUANT_CHUNK_ELEMENTS // w.shape[1])
    for r in range(0, w.shape[0], rows):
        yield r, w[r : r + rows].to(work or w.device).float()  # moved first: fewer bytes, converted there


def _gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and kernels.usable(x)


def chunked_mm(
    x2: torch.Tensor, out_features: int, step: int, dense: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """x2 [T, in] @ W^T for a prompt, W [out, in] made `step` rows at a time by `dense(start, stop)` in x2's
    dtype: one chunk of the weight exists dequantized, not all of it (the plan counts the chunk and its GEMM
    output: placement/estimate.gpu_dequant_bytes)."""
    if step >= out_features:
        return F.linear(x2, dense(0, out_features))
    y = x2.new_empty(len(x2), out_features)
    for r in range(0, out_features, step):
        w = dense(r, min(r + step, out_features))
        y[:, r : r + len(w)] = F.linear(x2, w)
    return y


class Int8Linear(nn.Module):
    """int8 weights in groups of `INT8_GROUP_SIZE` (32) consecutive input features, asymmetric: w ~= d q + m
    with codes q 0..255, d = (max - min) / 255 and m = min, both f16 (GGUF Q4_1's formula with 8-bit codes).
    The offset puts a 4-bit grid (the weights of a Q4 GGUF: m + d' q', q' 0..15) on every 17th code, so such
    weights come back exactly but for the f16 rounding of d; a symmetric Q8_0 grid cannot hold their offset
    (benchmarks/RESULTS-quant.md). Two layouts of the same bytes (formats.isq_stored_tensors: 36 per 32):
    - `blocks` (a CPU layer with the C kernels of quant/gguf_kernels.py, input a whole number of groups):
      `qweight` uint8 [out, G*34] as GGUF Q8_0 blocks (f16 d, int8 codes q - 128) and `offset` f16 [out, G]
      (m): w = d (q - 128) + (m + 128 d). gguf_cpu.c multiplies the blocks in f32; decode rows through
      `gguf_gemv_q8_off`, which adds the group sums of x times (m + 128 d) block by block as it reads d (no
      f32 [out, G] term per call); prompts: the int16 GEMM of the blocks (`gguf_gemm`, x rounded to int16 per
      block of 32 as in decode) plus the term once (without AVX512-VNNI: chunks dequantized into torch's GEMM).
    - plain (GPUs, and CPUs without the C kernels): `qweight` uint8 [out, G*32] (the input zero-padded to
      whole groups), `scale` f16 [out, G] (d), `offset` f16 [out, G] (m): the Triton GEMV's layout
      (quant/kernels.gemv_w8); prompts, and the CPU without the C kernels, dequantize row chunks into a GEMM.
      Symmetric (a GGUF's Q8_0 / Q5_0 / Q4_0 / Q6_K kept on a GPU: quant/gguf_gpu.py): `offset` None, the
      offset implied, m = -128 d (w = d (q - 128)).
    """

    def __init__(
        self,
        lin: nn.Linear,
        on_cpu: bool = False,
        work: torch.device | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        w = lin.weight.detach()  # [out, in]
        out, inp = w.shape
        dev = device or w.device
        G = -(-inp // INT8_GROUP_SIZE)
        self.blocks = on_cpu and inp % INT8_GROUP_SIZE == 0 and gguf_kernels.library() is not None
        if self.blocks:
            qweight = torch.empty(out, G * Q8_0_BLOCK_BYTES, dtype=torch.uint8, device=dev)
        else:
            qweight = torch.empty(out, G * INT8_GROUP_SIZE, dtype=torch.uint8, device=dev)
            scale = torch.empty(out, G, dtype=torch.float16, device=dev)
        offset = torch.empty(out, G, dtype=torch.float16, device=dev)
        for r, c in _rows(w, work):
            d, m, qc = quantize_int8_groups(c, G)
            n = len(c)
            if self.blocks:  # Q8_0 blocks: d, then the codes as int8 q - 128
                codes = (qc.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)
                blk = torch.cat([d.view(torch.uint8).view(n, G, 2), codes], dim=-1)
                qweight[r : r + n] = blk.view(n, -1).to(dev)
            else:
                qweight[r : r + n] = qc.view(n, -1).to(dev)
                scale[r : r + n] = d.to(dev)
            offset[r : r + n] = m.to(dev)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        if not self.blocks:
            self.scale = nn.Parameter(scale, requires_grad=False)
        self.offset = nn.Parameter(offset, requires_grad=False)
        self.bias = lin.bias
        self.out_features, self.in_features, self.groups = out, inp, G

    def _block_parts(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks layout, rows a:b: (codes q - 128 int8 [rows, G, 32], d f16 [rows, G]) viewing the bytes."""
        blk = self.qweight[a:b].view(-1, self.groups, Q8_0_BLOCK_BYTES)
        return blk[..., 2:].view(torch.int8), blk[..., :2].view(torch.float16)[..., 0]

    def _offset_term(self, a: int, b: int) -> torch.Tensor:
        """Blocks layout, rows a:b: m + 128 d f32 [rows, G], what each group adds per unit of its inputs' sum."""
        _, d = self._block_parts(a, b)
        return self.offset[a:b].float().add_(d.float(), alpha=128.0)

    def _dense(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows a:b of W [rows, in] in `dtype`: each weight computed in f32, rounded once."""
        if self.blocks:
            q, d = self._block_parts(a, b)
            df = d.float()[..., None]
            w = q.float() * df + (self.offset[a:b].float()[..., None] + 128.0 * df)
        else:
            q = self.qweight[a:b].view(-1, self.groups, self.qweight.shape[1] // self.groups)  # 32 (16: Q6_K)
            s = self.scale[a:b].float()[..., None]
            if self.offset is None:  # symmetric
                w = (q.float() - 128.0) * s
            else:
                w = q.float() * s + self.offset[a:b].float()[..., None]
        return w.view(len(w), -1)[:, : self.in_features].to(dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self._dense(0, self.out_features, dtype)

    def _dequant_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ W^T for prompts: the weight dequantized by row chunks into a GEMM (an int8 lm_head is 0.5 G
        weights; the plan's transient is one fused projection in the model dtype): DEQUANT_CHUNK_ELEMENTS at a
        time by the Triton kernel on a GPU, a quarter of that in torch elsewhere (an f32 copy beside it)."""
        gpu = _gpu(x2) and not self.blocks
        rows = max(1, DEQUANT_CHUNK_ELEMENTS // (1 if gpu else 4) // self.in_features)

        def dense(a: int, b: int) -> torch.Tensor:
            if not gpu:
                return self._dense(a, b, x2.dtype)
            o = self.offset
            return kernels.dequant_w8(
                self.qweight[a:b], self.scale[a:b], None if o is None else o[a:b], self.in_features, x2.dtype
            )

        return chunked_mm(x2, self.out_features, rows, dense)

    def _blocks_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (f32, contiguous, CPU) @ W^T: the Q8_0 blocks through gguf_cpu.c (decode rows: the GEMV that adds
        the offsets' term; prompts: its int16 GEMM, else chunks dequantized exactly to f32 for torch's GEMM),
        plus the group sums of x times m + 128 d."""
        if len(x2) <= gguf_kernels.GEMV_ROWS:  # the offsets' term inside the C kernel, block by block
            return gguf_kernels.gemv_q8_off(self.qweight, self.offset.contiguous(), x2)
        y = torch.empty(len(x2), self.out_features)
        if gguf_kernels.gemm(self.qweight, "q8_0", x2, y):  # int16 x per block, as decode
            c = self._offset_term(0, self.out_features)  # [out, G], once per prompt chunk
            return y.addmm_(x2.view(len(x2), self.groups, INT8_GROUP_SIZE).sum(-1), c.T)
        rows = max(16, CHUNK_WEIGHTS // self.in_features)
        for r in range(0, self.out_features, rows):
            wf = gguf_kernels.dequant(self.qweight[r : r + rows], "q8_0", self.in_features)
            c = self._offset_term(r, r + len(wf))
            wf.view(len(wf), self.groups, INT8_GROUP_SIZE).add_(c[..., None])
            torch.mm(x2, wf.T, out=y[:, r : r + len(wf)])
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if _gpu(x) and not self.blocks and x2.shape[0] <= kernels.GEMV_MAX_ROWS:
            y = kernels.gemv_w8(x2.contiguous(), self.qweight, self.scale, self.offset)
        elif self.blocks and x.device.type == "cpu":
            y = self._blocks_mm(x2.float().contiguous()).to(x.dtype)
        else:  # prompts on a GPU (also a CPU layer's blocks streamed there), the CPU without the C kernels
            y = self._dequant_mm(x2)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


INT8_STEPS = (255, 254, 252, 248)
"""Steps the range of a group of 32 may be cut into (quantize_int8_groups; the first unless the weights lie on
grids): 255 holds 1-, 2-, 4- and 8-bit
grids of weights spanning the group exactly (15 steps: every 17th code), 254 7-bit ones, 252 3- and 6-bit ones,
248 5-bit ones."""


def _grid(c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d', on) [n, G] for groups c [n, G, 32]: d' the least gap between sorted weights, or its half, third or
    quarter, the coarsest that all weights lie on (`on`: whether one does, as a GGUF's dequantized blocks)."""
    srt = c.sort(-1).values
    gap = srt[..., 1:] - srt[..., :-1]
    tol = (hi - lo)[..., None] * 1e-4
    least = torch.where(gap > tol, gap, torch.inf).amin(-1)
    dp, on = least, torch.zeros_like(least, dtype=torch.bool)
    for k in (4, 3, 2, 1):  # a sparse 8-bit grid's least gap may be a few steps
        r = (c - lo[..., None]) / (least / k)[..., None]
        ok = (r - r.round()).abs().amax(-1) < 1e-3
        dp, on = torch.where(ok, least / k, dp), on | ok
    return dp, on


def _grid_candidates(
    c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(d, m) f32 [n, G] pairs for groups whose weights lie on a grid (a GGUF's blocks dequantized:
    w = m' + d' q, d' from `_grid`): m the group's min, or else the first of -d', -2d', ..., -256d' below it
    that f16 holds exactly (symmetric types' grids pass through 0: Q5_0's m is -16 d', Q8_0's -128 d');
    d = d' / j, j the largest power of two that keeps the codes within 255 (exact in f16 when d' is and d is
    not subnormal), or j = 1. Groups off any grid get d = 0 (then not chosen)."""
    dp, on = _grid(c, lo, hi)
    m, found = lo.clone(), lo.to(torch.float16).float() == lo
    for p in range(9):  # the first f16-exact grid point at or below the min
        cand = -(2.0**p) * dp
        ok = ~found & (cand <= lo) & (cand.to(torch.float16).float() == cand)
        m, found = torch.where(ok, cand, m), found | ok
    span = (hi - m) / dp
    j = torch.exp2(torch.floor(torch.log2(255.0 / span)))
    good = on & found & torch.isfinite(dp) & (span <= 255)
    return [(torch.where(good, dp / j, 0.0), m), (torch.where(good, dp, 0.0), m)]


GRID_PROBE_ROWS = 8
"""Rows whose groups are checked for grids first (`_grid`): where none lies on one (weights of a bf16 or f32
checkpoint), d = range / 255 without the search (several times faster)."""


def quantize_int8_groups(c: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f32 rows [n, in] -> (d f16 [n, G], m f16 [n, G], codes uint8 [n, G, 32]) with w ~= d q + m and
    q = round((w - m) / d) (with the f16 values; inputs zero-padded to whole groups; a group whose d is 0 gets
    codes 0). d and m: `_scale_offset`, a quarter of the rows at a time (its transients, a sort among them,
    stay within QUANT_TRANSIENT_COPIES copies of the chunk)."""
    c = F.pad(c, (0, groups * INT8_GROUP_SIZE - c.shape[1])).view(len(c), groups, INT8_GROUP_SIZE)
    d = torch.empty(len(c), groups, dtype=torch.float16, device=c.device)
    m = torch.empty_like(d)
    step = max(1, -(-len(c) // 4))
    for a in range(0, len(c), step):
        d[a : a + step], m[a : a + step] = _scale_offset(c[a : a + step])
    df = d.float()
    q = c.sub_(m.float()[..., None]).div_(torch.where(df > 0, df, 1.0)[..., None]).round_().clamp_(0, 255)
    return d, m, q.to(torch.uint8)


def _scale_offset(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups [n, G, 32] -> (d, m) f16 [n, G]: m the min and d = (max - min) / 255; where the rows' weights lie
    on grids (a probe of GRID_PROBE_ROWS), per group the least squared error of that, the other steps of
    `INT8_STEPS` and `_grid_candidates`."""
    lo, hi = c.amin(-1), c.amax(-1)
    k = GRID_PROBE_ROWS
    if not _grid(c[:k], lo[:k], hi[:k])[1].any():
        return ((hi - lo) / 255).clamp_(max=65504.0).to(torch.float16), lo.clamp(-65504.0, 65504.0).half()
    cands = [((hi - lo) / steps, lo) for steps in INT8_STEPS] + _grid_candidates(c, lo, hi)
    d = m = err = None
    for dn, mn in cands:
        dn = dn.clamp(max=65504.0).to(torch.float16)
        mn = mn.clamp(-65504.0, 65504.0).to(torch.float16)
        df, mf = dn.float()[..., None], mn.float()[..., None]
        df = torch.where(df > 0, df, 1.0)
        e = torch.sub(c, mf).div_(df).round_().clamp_(0, 255).mul_(df).add_(mf).sub_(c).square_().sum(-1)
        if d is None:
            d, m, err = dn, mn, e
        else:
            better = e < err
            d, m, err = torch.where(better, dn, d), torch.where(better, mn, m), torch.where(better, e, err)
    return d, m


class Int4Linear(nn.Module):
    """int4 weights, groups of 32 along the input, bf16 scale and zero per group.

    On CPU the weight is kept in the layout of torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`,
    which reads half a byte per weight and takes bf16 activations: the input of this projection is rounded
    to bf16, the output comes back in the input's dtype, and the residual stream keeps its dtype). Elsewhere
    the plain layout of `quant/formats.py`. Same bytes either way. `dense_copy`: a CPU layer also keeps a
    bf16 copy for prompts; without it, its prompts run on the GPU it is streamed to (`unpack_cpu_int4`) or
    through the int4 kernel.
    """

    def __init__(
        self,
        lin: nn.Linear,
        on_cpu: bool = False,
        work: torch.device | None = None,
        device: torch.device | str | None = None,
        dense_copy: bool = CPU_INT4_DENSE_COPY,
    ) -> None:
        super().__init__()
        w = lin.weight.detach()
        out, inp = w.shape
        dev = device or w.device
        self.dense = None
        if on_cpu and dense_copy:  # CPU prompts use this bf16 copy (see quant/formats.py)
            self.dense = nn.Parameter(w.to(device=dev, dtype=torch.bfloat16), requires_grad=False)
        G = -(-inp // INT4_GROUP_SIZE)
        q = torch.empty(out, G * INT4_GROUP_SIZE // 2, dtype=torch.uint8, device=dev)  # 2j low, 2j+1 high
        scale = torch.empty(out, G, dtype=torch.bfloat16, device=dev)
        zero = torch.empty(out, G, dtype=torch.bfloat16, device=dev)
        for r, c in _rows(w, work):
            c = F.pad(c, (0, G * INT4_GROUP_SIZE - inp)).view(len(c), G, INT4_GROUP_SIZE)
            lo, hi = c.amin(-1), c.amax(-1)  # [rows, G]
            s = ((hi - lo) / 15.0).clamp(min=1e-8)
            z = -lo / s
            qc = (
                c.div_(s[..., None])
                .add_(z[..., None])
                .round_()
                .clamp_(0, 15)
                .to(torch.uint8)
                .view(len(c), -1)
            )
            q[r : r + len(c)] = (qc[:, 0::2] | (qc[:, 1::2] << 4)).to(dev)
            scale[r : r + len(c)] = s.to(torch.bfloat16).to(dev)
            zero[r : r + len(c)] = z.to(torch.bfloat16).to(dev)
        self.cpu_kernel = on_cpu and inp % INT4_GROUP_SIZE == 0 and out % 16 == 0
        if self.cpu_kernel:  # kernel layout; scales_and_zeros[g, o] = (scale, value at q = 8)
            qi = torch.stack([q & 0x0F, q >> 4], dim=-1).view(out, -1).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 1)
            sf, zf = scale.float(), zero.float()
            sz = torch.stack([sf, (8.0 - zf) * sf], dim=-1).transpose(0, 1).contiguous()
            self.qweight = nn.Parameter(packed, requires_grad=False)
            self.scales_zeros = nn.Parameter(sz.to(torch.bfloat16), requires_grad=False)  # [G, out, 2]
        else:
            self.qweight = nn.Parameter(q, requires_grad=False)
            self.scale = nn.Parameter(scale, requires_grad=False)
            self.zero = nn.Parameter(zero, requires_grad=False)
        self.bias = lin.bias
        self.out_features, self.in_features, self.groups = out, inp, G

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.cpu_kernel:  # W^T = I @ W^T through the kernel itself (tests and rare paths only)
            eye = torch.eye(self.in_features, dtype=torch.bfloat16)
            wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
                eye, self.qweight, INT4_GROUP_SIZE, self.scales_zeros
            )
            return wt.T.to(dtype)
        q = torch.stack([self.qweight & 0x0F, self.qweight >> 4], dim=-1).view(
            self.out_features, self.groups, -1
        )
        w = (q.to(dtype) - self.zero.to(dtype)[..., None]) * self.scale.to(dtype)[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qweight, self.in_features
        # streamed: a CPU layer's CPU-kernel bytes on a GPU, for a long prompt (engine/offload.py)
        streamed = self.cpu_kernel and x.device.type != "cpu"
        if streamed and self.dense is not None:
            return F.linear(x, self.dense.to(x.dtype), self.bias)
        if streamed or (_gpu(x) and not self.cpu_kernel):
            x2 = x.reshape(-1, k)
            if streamed:  # whole blocks of 64 rows (the layout's) at a time
                sz, rows = self.scales_zeros, max(64, DEQUANT_CHUNK_ELEMENTS // k // 64 * 64)
                y = chunked_mm(
                    x2, self.out_features, rows, lambda a, b: unpack_cpu_int4(q[a:b], sz[:, a:b], k, x.dtype)
                )
            elif x2.shape[0] <= kernels.GEMV_MAX_ROWS:
                y = kernels.gemv_w4(x2.contiguous(), self.qweight, self.scale, self.zero, k)
            else:  # prompts: dequantize into cuBLAS, DEQUANT_CHUNK_ELEMENTS weights at a time
                s, z, rows = self.scale, self.zero, max(1, DEQUANT_CHUNK_ELEMENTS // k)
                y = chunked_mm(
                    x2,
                    self.out_features,
                    rows,
                    lambda a, b: kernels.dequant_w4(q[a:b], s[a:b], z[a:b], k, x.dtype),
                )
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.cpu_kernel and x.device.type == "cpu":
            shape = x.shape
            xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
            if self.dense is not None and xb.shape[0] > INT4_KERNEL_MAX_ROWS:
                y = F.linear(xb, self.dense)  # prefill: dense bf16 GEMM
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    xb, self.qweight, INT4_GROUP_SIZE, self.scales_zeros
                )
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(x.dtype), self.bias)


def _cpu_int4_codes(packed: torch.Tensor, n: int, k: int, interleaved: bool) -> torch.Tensor:
    """The codes [n, k] (uint8, 0..15) of a weight in the layout of torch's int4 CPU kernel
    (`_convert_weight_to_int4pack_for_cpu`): rows in blocks of 64, each block k-major (k x 32 bytes). A whole
    block built for AVX-512 (`interleaved`) packs rows j and 32+j into byte j; other blocks pack rows 2j and
    2j+1 into byte j (low nibble first)."""
    flat, full = packed.reshape(-1), n // 64
    parts = []
    if full:
        p = flat[: full * k * 32].view(full, k, 32)
        q = torch.stack([p & 15, p >> 4], dim=2 if interleaved else 3)  # row 32 nibble + j, or 2j + nibble
        parts.append(q.view(full, k, 64).transpose(1, 2).reshape(full * 64, k))
    if tail := n - 64 * full:
        p = flat[full * k * 32 : full * k * 32 + k * tail // 2].view(k, tail // 2)
        parts.append(torch.stack([p & 15, p >> 4], dim=-1).view(k, tail).T)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@functools.cache
def cpu_int4_interleaved(n: int) -> bool | None:
    """Which layout torch's int4 CPU packing gives a weight of n rows on this machine: True for AVX-512's
    interleaved blocks, False for pairs of rows, None for neither (then `unpack_cpu_int4` falls back to the
    kernel itself, on the CPU: slow, but right). Found by packing a small probe with n rows."""
    q = torch.randint(
        0, 16, (n, INT4_GROUP_SIZE), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for interleaved in (True, False):
        if torch.equal(_cpu_int4_codes(packed, n, INT4_GROUP_SIZE, interleaved).to(torch.int32), q):
            return interleaved
    return None


def unpack_cpu_int4(
    packed: torch.Tensor, scales_zeros: torch.Tensor, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """The dense weight [n, k] in `dtype` of an int4 weight in torch's CPU-kernel layout (`packed` uint8
    [n, k/2], `scales_zeros` [k/32, n, 2]), computed on whatever device the two tensors are on (a GPU, for a
    CPU layer streamed there): w = (q - 8) * scale + zero, in f32, rounded once. Row chunks of
    UNPACK_CHUNK_ELEMENTS keep the transients small."""
    n = scales_zeros.shape[1]
    interleaved = cpu_int4_interleaved(n)
    if interleaved is None:  # W^T = I W^T through the kernel on the CPU (a layout this code does not know)
        eye = torch.eye(k, dtype=torch.bfloat16)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, packed.cpu(), INT4_GROUP_SIZE, scales_zeros.cpu()
        )
        return wt.T.to(device=packed.device, dtype=dtype)
    flat = packed.reshape(-1)
    w = torch.empty(n, k, dtype=dtype, device=packed.device)
    step = max(64, UNPACK_CHUNK_ELEMENTS // k // 64 * 64)  # whole blocks of 64 rows: contiguous bytes
    for r in range(0, n, step):
        rows = min(step, n - r)
        codes = _cpu_int4_codes(flat[r * k // 2 : (r + rows) * k // 2], rows, k, interleaved)
        sz = scales_zeros[:, r : r + rows].float()  # [G, rows, 2]
        s, z = sz[..., 0].T[..., None], sz[..., 1].T[..., None]  # [rows, G, 1]
        c = codes.reshape(rows, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE).float()
        w[r : r + rows] = ((c - 8.0) * s + z).view(rows, k).to(dtype)
    return w


def quantize_linear(
    lin: nn.Linear,
    bits: int,
    on_cpu: bool = False,
    work: torch.device | None = None,
    device: torch.device | str | None = None,
    dense_copy: bool = CPU_INT4_DENSE_COPY,
) -> nn.Module:
    """The quantized form of `lin`, its tensors on `device` (default: the weight's); see quantize_layer.
    `dense_copy`: an int4 layer computed on the CPU keeps a bf16 copy for prompts (Int4Linear)."""
    q = (
        Int4Linear(lin, on_cpu, work, device, dense_copy)
        if bits == 4
        else Int8Linear(lin, on_cpu, work, device)
    )
    held = sum(
        t.numel() * t.element_size()
        for n, t in q.named_parameters(recurse=False)
        if n not in ("dense", "bias")
    )
    assert held == quantized_nbytes(tuple(lin.weight.shape), bits)  # the bytes the planner counted
    return q


def quantize_layer(
    layer: nn.Module, bits: int, on_cpu: bool = False, work: torch.device | None = None
) -> None:
    """Replace every nn.Linear inside `layer` (a decoder layer) with its quantized form, in place.
    `on_cpu`: the layer is computed on the CPU (its kernels and copies are chosen for that).
    `work`: the device the quantization math runs on (a GPU is ~50x faster than the CPU for this); the
    results land on the weights' own device."""
    for name, mod in list(layer.named_modules()):
        if isinstance(mod, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, quantize_linear(mod, bits, on_cpu, work))


def layer_params(layer: nn.Module) -> int:
    """Weights (elements) of a decoder layer as the model defines them, quantized projections counted by
    their logical shape (their bytes per weight differ; the cost model needs the FLOPs)."""
    n = 0
    for m in layer.modules():
        if isinstance(m, (Int4Linear, Int8Linear)):
            n += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        elif not list(m.children()):
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return n

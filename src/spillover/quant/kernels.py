"""Triton kernels for weight-only quantized matmuls on the GPU (the layouts of `quant/formats.py`).

- `gemv_w4` / `gemv_w8`: y = x @ W^T for a few rows of x (decode). One program per (row of x, tile of output
  rows); consecutive programs share x and, for several rows of x, the weights through L2, so a small batch
  costs about one read of the weights: 0.625 (int4) or 1.125 (int8) bytes per weight with the group scales.
  The default tilings (`W4_CFGS`, `W8_CFGS`) run the word kernel (`_gemv_rows_kernel`): the weights read as
  32-bit words in 16-byte chunks, each code put into an f32 mantissa by one shift and one and-or
  (`_code`), one FMA per weight, each output row a 2-D [chunks, words] tile so x shares the weights' layout,
  bf16 x read 4 values per 8-byte load (`_x_quad`). The byte kernels (`_gemv_w4_kernel`, `_gemv_w8_kernel`:
  codes as 2^23 + q, then subtracted) stay for 3-tuple tilings and benchmarks.
- `dequant_w4`: the int4 weight to a dense [out, in] matrix in the activation dtype, for prompts (many rows),
  which then run in cuBLAS (compute-bound; the dequantization adds about 2.6 bytes per weight of traffic).
- `dequant_w8`: the same for int8 (groups of 32 with scale and offset).
The int8 kernels also take a symmetric weight (offsets None: a GGUF's Q8_0 / Q5_0 / Q4_0 / Q6_K kept on a GPU,
w = s (q - 128)): a constexpr `SYM` computes o = -128 s in registers instead of loading it (`_load_z`), so the
asymmetric kernels compile as before.

All launches are graph-capturable (no host syncs, no allocations besides the outputs). Math in fp32, one
rounding at the output. The word kernels take each group's x sum back out of sums of (1 + q/16) x, which
costs a few bits of the f32 sums: with f32 outputs (tests, against f64 products) their largest error is
about 4e-7 of the largest output (byte kernels 2e-7), 3e-6 for "rows2"'s low nibbles (1 + q/256), against
the 4e-3 of a bf16 output's own rounding. Tests run them in Triton's CPU interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch

from spillover.layers.triton_fused import HAVE_TRITON, on_device

if HAVE_TRITON:  # layers/triton_fused.py decides (a CUDA device or the interpreter, and triton installed)
    import triton
    import triton.language as tl

ENABLED = True  # switch for benchmarks comparing against the dequantize-per-call path
GEMV_MAX_ROWS = 8
"""Inputs up to this many rows run in the GEMV kernels; more (prompts, large decode batches) dequantize the
weight and use cuBLAS."""

W4_CFGS = {"wide": (8, 32, 1, "rows"), "deep": (8, 64, 2, "rows2"), "square": (8, 64, 2, "rows2")}
"""int4 GEMV tiling per weight shape class (`shape_class`): (output rows a program, 16-byte chunks a step, warps,
kernel: "rows" `_gemv_rows_kernel`, "rows2" the same with PAIR); a 3-tuple is the byte kernel's (rows, bytes a
step, warps). Chosen by the sweep of benchmarks/quant_kernels.py on an H200 (Llama-3-8B shapes, batch 1;
RESULTS-quant.md, 2026-12-02 sixth session): 58.7 us per layer against 94.0 for the best byte tiling."""
W8_CFGS = {"wide": (4, 32, 1, "rows"), "deep": (4, 128, 4, "rows"), "square": (4, 128, 4, "rows")}
"""int8 GEMV tiling per weight shape class, as W4_CFGS (a 3-tuple: the byte kernel's rows, weights a step, warps).
The same sweep: 76.7 us per layer against 82.7 for the best byte tiling."""


ONE_BITS = 0x3F800000
"""1.0 as f32 bits: the word kernels' exponent for codes put into mantissas (an argument, see `_code`)."""


def shape_class(n: int, k: int) -> str:
    """'wide' (out > 2 x in: gate_up), 'deep' (in > 2 x out: down), else 'square' (qkv, o)."""
    return "wide" if n > 2 * k else "deep" if k > 2 * n else "square"


if HAVE_TRITON:

    @triton.jit
    def _expert_rows(Q, S, Z, IDX, m, s_qe, s_se, RPT, EXPERTS: tl.constexpr):
        # output row m's weights Q, scales S and zeros / offsets Z, and its row of x: with EXPERTS (Q, S, Z
        # stacked [E, ...]), expert IDX[m]'s and x row m // RPT
        xm = m
        if EXPERTS:
            e = tl.load(IDX + m).to(tl.int64)
            Q += e * s_qe
            S += e * s_se
            Z += e * s_se
            xm = m // RPT
        return Q, S, Z, xm

    @triton.jit
    def _gemv_w4_kernel(
        X, Q, S, Z, Y, IDX, N, K, KB, G, s_xm, s_ym, s_qe, s_se, RPT,
        BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, EVEN: tl.constexpr, EXPERTS: tl.constexpr,
    ):  # fmt: skip
        # Q: uint8 [N, KB] (weight 2j in the low nibble, 2j+1 in the high one); S, Z: [N, G], 16 bytes a group
        # EXPERTS: Q, S, Z stacked [E, ...]; output row m uses expert IDX[m] and input row m // RPT
        m = tl.program_id(0).to(tl.int64)
        Q, S, Z, xm = _expert_rows(Q, S, Z, IDX, m, s_qe, s_se, RPT, EXPERTS)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        nm = n < N
        n64 = n.to(tl.int64)
        GB: tl.constexpr = BLOCK_KB // 16  # groups per tile
        acc = tl.zeros([BLOCK_N, GB], dtype=tl.float32)
        for k0 in range(0, KB, BLOCK_KB):
            b = k0 + tl.arange(0, BLOCK_KB)  # byte index in the row
            g = k0 // 16 + tl.arange(0, GB)
            if EVEN:
                q = tl.load(Q + n64[:, None] * KB + b[None, :], mask=nm[:, None], other=0)
                xe = tl.load(X + xm * s_xm + 2 * b).to(tl.float32)
                xo = tl.load(X + xm * s_xm + 2 * b + 1).to(tl.float32)
                gm = nm[:, None]
            else:
                q = tl.load(Q + n64[:, None] * KB + b[None, :], mask=nm[:, None] & (b < KB)[None, :], other=0)
                xe = tl.load(X + xm * s_xm + 2 * b, mask=2 * b < K, other=0.0).to(tl.float32)
                xo = tl.load(X + xm * s_xm + 2 * b + 1, mask=2 * b + 1 < K, other=0.0).to(tl.float32)
                gm = nm[:, None] & (g < G)[None, :]
            s = tl.load(S + n64[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)  # [BN, GB]
            z = tl.load(Z + n64[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)
            q = q.to(tl.int32)
            # nibble -> float without int-to-float conversions (quarter rate): 2^23 + v has v as its mantissa
            lo = ((q & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            hi = ((q >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            p = lo * xe[None, :] + hi * xo[None, :]  # [BN, BKB]
            pg = tl.sum(tl.reshape(p, [BLOCK_N, GB, 16]), axis=2)  # sum q*x per group
            xg = tl.sum(tl.reshape(xe + xo, [GB, 16]), axis=1)  # sum x per group
            acc += s * (pg - z * xg[None, :])  # sum (q - z) * s * x
        tl.store(Y + m * s_ym + n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=nm)

    @triton.jit
    def _gemv_w8_kernel(
        X, Q, S, OFF, Y, IDX, N, K, KP, G, s_xm, s_ym, s_qe, s_se, RPT,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, EXPERTS: tl.constexpr,
        GS: tl.constexpr = 32, SYM: tl.constexpr = False,
    ):  # fmt: skip
        # Q: uint8 codes [N, KP] (KP = GS G: the input padded to whole groups), S, OFF: [N, G], one scale and one
        # offset per group of GS (32; 16 for a GGUF's Q6_K); y = sum over groups of s * (x . q) + o * sum(x);
        # EXPERTS: as in _gemv_w4_kernel
        m = tl.program_id(0).to(tl.int64)
        Q, S, OFF, xm = _expert_rows(Q, S, OFF, IDX, m, s_qe, s_se, RPT, EXPERTS)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        n64 = n.to(tl.int64)
        GB: tl.constexpr = BLOCK_K // GS  # groups per tile
        acc = tl.zeros([BLOCK_N, GB], dtype=tl.float32)
        for k0 in range(0, KP, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            g = k0 // GS + tl.arange(0, GB)
            if EVEN:
                q = tl.load(Q + n64[:, None] * KP + k[None, :], mask=nm[:, None], other=0)
                x = tl.load(X + xm * s_xm + k).to(tl.float32)
                gm = nm[:, None]
            else:
                q = tl.load(Q + n64[:, None] * KP + k[None, :], mask=nm[:, None] & (k < KP)[None, :], other=0)
                x = tl.load(X + xm * s_xm + k, mask=k < K, other=0.0).to(tl.float32)
                gm = nm[:, None] & (g < G)[None, :]
            s = tl.load(S + n64[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)  # [BN, GB]
            o = _load_z(OFF + n64[:, None] * G + g[None, :], s, gm, False, SYM)
            # byte -> float as 2^23 + v (v the mantissa), no int-to-float conversion (quarter rate)
            f = ((q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)) - 8388608.0
            pg = tl.sum(tl.reshape(f * x[None, :], [BLOCK_N, GB, GS]), axis=2)  # sum q*x per group
            xg = tl.sum(tl.reshape(x, [GB, GS]), axis=1)  # sum x per group
            acc += s * pg + o * xg[None, :]
        tl.store(Y + m * s_ym + n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=nm)

    @triton.jit
    def _gemv_w4w_kernel(
        X, Q, S, Z, Y, IDX, N, K, G, s_xm, s_ym, s_qe, s_se, RPT,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr, EXPERTS: tl.constexpr,
    ):  # fmt: skip
        # The int4 GEMV on 32-bit words: Q viewed as int32 [N, 4 G] (a group's 16 bytes = 4 words; nibble i of
        # word j of group g is weight 32 g + 8 j + i). Each thread holds whole groups of BLOCK_N rows, so the
        # group sums stay in its registers and the x values it loads serve all its rows. A nibble becomes
        # 1 + q/16 by one shift and one and-or into the top of an f32 mantissa (no conversion, no subtraction:
        # sum (1 + q/16) x = X + Q/16 per group, Q = sum q x recovered as 16 (that - X)).
        m = tl.program_id(0).to(tl.int64)
        Q, S, Z, xm = _expert_rows(Q, S, Z, IDX, m, s_qe, s_se, RPT, EXPERTS)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        nm = n < N
        n64 = n.to(tl.int64)
        j = tl.arange(0, 4)  # word of a group
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)  # [BG]
            wp = Q + n64[:, None, None] * (4 * G) + g[None, :, None] * 4 + j[None, None, :]
            xp = X + xm * s_xm + g[:, None] * 32 + j[None, :] * 8  # [BG, 4]: weight 0 of each word
            if EVEN:
                w = tl.load(wp, mask=nm[:, None, None], other=0)  # [BN, BG, 4]
                gm = nm[:, None]
            else:
                w = tl.load(wp, mask=nm[:, None, None] & (g < G)[None, :, None], other=0)
                gm = nm[:, None] & (g < G)[None, :]
            s = tl.load(S + n64[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)  # [BN, BG]
            z = tl.load(Z + n64[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)
            xs = tl.zeros([BLOCK_G, 4], dtype=tl.float32)
            p = tl.zeros([BLOCK_N, BLOCK_G, 4], dtype=tl.float32)
            for i in tl.static_range(8):
                if EVEN:
                    xi = tl.load(xp + i).to(tl.float32)
                else:
                    xk = g[:, None] * 32 + j[None, :] * 8 + i
                    xi = tl.load(xp + i, mask=xk < K, other=0.0).to(tl.float32)
                if i <= 4:  # nibble i (bits 4i..4i+3) to mantissa bits 19..22
                    t = w << (19 - 4 * i)
                else:
                    t = w >> (4 * i - 19)  # arithmetic shift: the sign bits land above bit 22, masked
                f = ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 16
                p += f * xi[None, :, :]
                xs += xi
            xg = tl.sum(xs, axis=1)  # [BG] sum of x per group
            qx = (tl.sum(p, axis=2) - xg[None, :]) * 16.0  # sum q x per group
            acc += s * (qx - z * xg[None, :])  # sum (q - z) s x
        tl.store(Y + m * s_ym + n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=nm)

    @triton.jit
    def _gemv_w8w_kernel(
        X, Q, S, OFF, Y, IDX, N, K, G, s_xm, s_ym, s_qe, s_se, RPT,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, EVEN: tl.constexpr, EXPERTS: tl.constexpr,
        GS: tl.constexpr = 32, SYM: tl.constexpr = False,
    ):  # fmt: skip
        # The int8 GEMV on 32-bit words: Q viewed as int32 [N, G GS/4] (byte i of word j of group g is weight
        # GS g + 4 j + i); as _gemv_w4w_kernel, each thread holds whole groups of BLOCK_N rows, and a byte
        # becomes 1 + q/256 by one shift and one and-or (sum (1 + q/256) x = X + Q/256 per group).
        m = tl.program_id(0).to(tl.int64)
        Q, S, OFF, xm = _expert_rows(Q, S, OFF, IDX, m, s_qe, s_se, RPT, EXPERTS)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        n64 = n.to(tl.int64)
        WPG: tl.constexpr = GS // 4  # words per group
        j = tl.arange(0, WPG)
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            wp = Q + n64[:, None, None] * (WPG * G) + g[None, :, None] * WPG + j[None, None, :]
            xp = X + xm * s_xm + g[:, None] * GS + j[None, :] * 4  # [BG, WPG]
            if EVEN:
                w = tl.load(wp, mask=nm[:, None, None], other=0)  # [BN, BG, WPG]
                gm = nm[:, None]
            else:
                w = tl.load(wp, mask=nm[:, None, None] & (g < G)[None, :, None], other=0)
                gm = nm[:, None] & (g < G)[None, :]
            s = tl.load(S + n64[:, None] * G + g[None, :], mask=gm, other=0.0).to(tl.float32)
            o = _load_z(OFF + n64[:, None] * G + g[None, :], s, gm, False, SYM)
            xs = tl.zeros([BLOCK_G, WPG], dtype=tl.float32)
            p = tl.zeros([BLOCK_N, BLOCK_G, WPG], dtype=tl.float32)
            for i in tl.static_range(4):
                if EVEN:
                    xi = tl.load(xp + i).to(tl.float32)
                else:
                    xk = g[:, None] * GS + j[None, :] * 4 + i
                    xi = tl.load(xp + i, mask=xk < K, other=0.0).to(tl.float32)
                if i <= 1:  # byte i (bits 8i..8i+7) to mantissa bits 15..22
                    t = w << (15 - 8 * i)
                else:
                    t = w >> (8 * i - 15)  # arithmetic shift: the sign bits land above bit 22, masked
                f = ((t & 0x007F8000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 256
                p += f * xi[None, :, :]
                xs += xi
            xg = tl.sum(xs, axis=1)
            qx = (tl.sum(p, axis=2) - xg[None, :]) * 256.0  # sum q x per group
            acc += s * qx + o * xg[None, :]
        tl.store(Y + m * s_ym + n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=nm)

    @triton.jit
    def _code(w, i: tl.constexpr, BITS: tl.constexpr, MAGIC):
        # code i of each 32-bit word as an f32 by one shift and one and-or into the top of the mantissa:
        # a nibble as 1 + q/16 (bits 19..22), a byte as 1 + q/256 (bits 15..22); right shifts are arithmetic,
        # their sign bits land above bit 22 and are masked. MAGIC is 1.0's bits (0x3F800000), a kernel argument
        # rather than a constant: the and-or then reads it from the constant bank, where two literal constants
        # made ptxas put one into a register before every use (12% fewer instructions at 8 rows, int4)
        if BITS == 4:
            if i <= 4:
                t = w << (19 - 4 * i)
            else:
                t = w >> (4 * i - 19)
            return ((t & 0x00780000) | MAGIC).to(tl.float32, bitcast=True)
        else:
            if i <= 1:
                t = w << (15 - 8 * i)
            else:
                t = w >> (8 * i - 15)
            return ((t & 0x007F8000) | MAGIC).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_z(ZP, sc, mask, EVEN: tl.constexpr, SYM: tl.constexpr):
        # the zeros (int4) or offsets (int8) at ZP in f32, masked unless EVEN; SYM (a symmetric int8 weight,
        # none stored): the offsets -128 times the scales sc
        if SYM:
            return -128.0 * sc
        elif EVEN:
            return tl.load(ZP).to(tl.float32)
        else:
            return tl.load(ZP, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _x_tile(xp, c, j, K, i: tl.constexpr, PER: tl.constexpr, EVEN: tl.constexpr):
        # x of code i of each word of a [chunks, 4 words] tile, in f32 (0 past the input's end)
        if EVEN:
            return tl.load(xp + i).to(tl.float32)
        else:
            xk = (c[:, None] * 4 + j[None, :]) * PER + i
            return tl.load(xp + i, mask=xk < K, other=0.0).to(tl.float32)

    @triton.jit
    def _x_quad(xq, c, j, K, k: tl.constexpr, PER: tl.constexpr, EVEN: tl.constexpr):
        # bf16 x read as int64 (XPACK): codes 4k..4k+3 of each word of a [chunks, 4 words] tile, as 4 f32 tiles
        # (bf16 -> f32 is the bits shifted up). One 8-byte load where `_x_tile` makes four 2-byte ones: x's
        # loads are strided by a chunk (64 or 32 bytes) across a warp, so their count, not their bytes, costs.
        if EVEN:
            v = tl.load(xq + k)
        else:
            v = tl.load(xq + k, mask=((c[:, None] * 4 + j[None, :]) * PER + 4 * k) < K, other=0)
        lo = v.to(tl.int32)
        hi = (v >> 32).to(tl.int32)
        a = (lo << 16).to(tl.float32, bitcast=True)
        b = (lo & -65536).to(tl.float32, bitcast=True)
        return a, b, (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _x_sums(x0, x1, x2, x3, x4, x5, x6, x7, PER: tl.constexpr):
        # per chunk: the sum of x, and of x at the even codes (for `_row_terms`' PAIR form)
        xe = x0 + x2
        xo = x1 + x3
        if PER == 8:
            xe += x4 + x6
            xo += x5 + x7
        xe = tl.sum(xe, axis=1)
        return xe + tl.sum(xo, axis=1), xe

    @triton.jit
    def _row_terms(
        w, sc, zc, x0, x1, x2, x3, x4, x5, x6, x7, xc, xe, MAGIC,
        BITS: tl.constexpr, PAIR: tl.constexpr,
    ):  # fmt: skip
        # One output row's terms per chunk of words w [BC, 4], scales sc and zeros (int4) / offsets (int8) zc
        # [BC]: one FMA per weight into the sums of code * x (codes as `_code` makes them; the 1 + ... comes back
        # out with the chunk's x sum). PAIR (int4): one shift per byte serves both its nibbles, the high one at
        # mantissa bits 19..22 (1 + q/16), the low one at 15..18 (1 + q/256, 4 bits less of the f32 sum kept
        # after the 1s cancel: still about 2^-17 of the chunk's |x| sum).
        if BITS == 4 and PAIR:
            b = w << 15  # byte 0: codes 1 (high) and 0 (low)
            ph = ((b & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * x1
            pl = ((b & 0x00078000) | MAGIC).to(tl.float32, bitcast=True) * x0
            b = w << 7
            ph += ((b & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * x3
            pl += ((b & 0x00078000) | MAGIC).to(tl.float32, bitcast=True) * x2
            b = w >> 1
            ph += ((b & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * x5
            pl += ((b & 0x00078000) | MAGIC).to(tl.float32, bitcast=True) * x4
            b = w >> 9
            ph += ((b & 0x00780000) | MAGIC).to(tl.float32, bitcast=True) * x7
            pl += ((b & 0x00078000) | MAGIC).to(tl.float32, bitcast=True) * x6
            qx = (tl.sum(ph, axis=1) - (xc - xe)) * 16.0 + (tl.sum(pl, axis=1) - xe) * 256.0
            return sc * (qx - zc * xc)
        p = _code(w, 0, BITS, MAGIC) * x0  # one FMA per weight from here: p += code * x
        p += _code(w, 1, BITS, MAGIC) * x1
        p += _code(w, 2, BITS, MAGIC) * x2
        p += _code(w, 3, BITS, MAGIC) * x3
        if BITS == 4:
            p += _code(w, 4, BITS, MAGIC) * x4
            p += _code(w, 5, BITS, MAGIC) * x5
            p += _code(w, 6, BITS, MAGIC) * x6
            p += _code(w, 7, BITS, MAGIC) * x7
            return sc * ((tl.sum(p, axis=1) - xc) * 16.0 - zc * xc)
        return sc * ((tl.sum(p, axis=1) - xc) * 256.0) + zc * xc

    @triton.jit
    def _gemv_rows_kernel(
        X, Q, S, Z, Y, IDX, N, K, G, s_xm, s_ym, s_qe, s_se, RPT, MAGIC,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr, EXPERTS: tl.constexpr, BITS: tl.constexpr,
        GS: tl.constexpr, PAIR: tl.constexpr = False, XPACK: tl.constexpr = False, SYM: tl.constexpr = False,
    ):  # fmt: skip
        # The GEMVs on 32-bit words: Q viewed as int32, read in chunks of 4 words (16 bytes: an int4 group of 32,
        # or half an int8 group of 32, or an int8 group of 16); code i of word j of chunk c is weight
        # PER (4 c + j) + i. [chunks, 4 words] tiles, one per output row, ROWS rows a program in an unrolled
        # loop: the x tiles have the weights' shape and order, so Triton gives them the same layout (no
        # conversions) and each thread's x values serve every row. A code becomes an f32 by one shift and one
        # and-or into the top of the mantissa (`_code`: 1 + q/16 or 1 + q/256), so sum (1 + q/16) x = X + Q/16
        # per chunk and Q = sum q x comes back as 16 (that - X), with no conversion or subtraction per weight.
        # BITS 4: Z the zeros, w = (q - z) s; BITS 8: Z the offsets, w = q s + o.
        m = tl.program_id(0).to(tl.int64)
        Q, S, Z, xm = _expert_rows(Q, S, Z, IDX, m, s_qe, s_se, RPT, EXPERTS)
        PER: tl.constexpr = 32 // BITS  # codes a word
        CPG: tl.constexpr = GS // (4 * PER)  # chunks a group
        C = G * CPG  # chunks a row
        n0 = tl.program_id(1) * ROWS
        j = tl.arange(0, 4)
        r = tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            if XPACK:  # X: the bf16 input as int64, s_xm in int64s
                xq = (
                    X + xm * s_xm + (c[:, None] * 4 + j[None, :]) * (PER // 4)
                )  # [BC, 4]: codes 0..3 of each word
                x0, x1, x2, x3 = _x_quad(xq, c, j, K, 0, PER, EVEN)
                x4, x5, x6, x7 = x0, x1, x2, x3  # (unread for int8)
                if PER == 8:
                    x4, x5, x6, x7 = _x_quad(xq, c, j, K, 1, PER, EVEN)
            else:
                xp = X + xm * s_xm + (c[:, None] * 4 + j[None, :]) * PER  # [BC, 4]: code 0 of each word
                x0 = _x_tile(xp, c, j, K, 0, PER, EVEN)
                x1 = _x_tile(xp, c, j, K, 1, PER, EVEN)
                x2 = _x_tile(xp, c, j, K, 2, PER, EVEN)
                x3 = _x_tile(xp, c, j, K, 3, PER, EVEN)
                x4, x5, x6, x7 = x0, x1, x2, x3  # (unread for int8)
                if PER == 8:
                    x4 = _x_tile(xp, c, j, K, 4, PER, EVEN)
                    x5 = _x_tile(xp, c, j, K, 5, PER, EVEN)
                    x6 = _x_tile(xp, c, j, K, 6, PER, EVEN)
                    x7 = _x_tile(xp, c, j, K, 7, PER, EVEN)
            xc, xe = _x_sums(x0, x1, x2, x3, x4, x5, x6, x7, PER)  # [BC]: x per chunk; of the even codes
            for row in tl.static_range(ROWS):
                n = tl.minimum(n0 + row, N - 1).to(
                    tl.int64
                )  # a ragged last tile reads row N-1 again, unstored
                wp = Q + n * (4 * C) + c[:, None] * 4 + j[None, :]
                sp = S + n * G + c // CPG
                zp = Z + n * G + c // CPG
                if EVEN:
                    w = tl.load(wp)  # [BC, 4]
                    sc = tl.load(sp).to(tl.float32)  # [BC]: the scale of each chunk's group
                else:
                    w = tl.load(wp, mask=(c < C)[:, None], other=0)
                    sc = tl.load(sp, mask=c < C, other=0.0).to(tl.float32)
                zc = _load_z(zp, sc, c < C, EVEN, SYM)
                t = _row_terms(w, sc, zc, x0, x1, x2, x3, x4, x5, x6, x7, xc, xe, MAGIC, BITS, PAIR)
                acc = tl.where(
                    (r == row)[:, None], acc + t[None, :], acc
                )  # row `row` (constant per register)
        n = n0 + r
        tl.store(Y + m * s_ym + n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=n < N)

    @triton.jit
    def _gemv_persist_kernel(
        X, Q, S, Z, Y, N, K, G, s_xm, s_ym, MAGIC,
        ROWS: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
        PAIR: tl.constexpr = False, XPACK: tl.constexpr = False, SYM: tl.constexpr = False,
    ):  # fmt: skip
        # _gemv_rows_kernel for inputs whose chunks fit one step (BLOCK_C >= chunks a row), persistent: a grid
        # of about what the GPU holds at once, each program loading x once and looping over tiles of ROWS rows
        # (no tail wave of programs, no x reloads per tile).
        m = tl.program_id(0).to(tl.int64)
        PER: tl.constexpr = 32 // BITS
        CPG: tl.constexpr = GS // (4 * PER)
        C = G * CPG
        j = tl.arange(0, 4)
        r = tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_C)
        if XPACK:
            xq = X + m * s_xm + (c[:, None] * 4 + j[None, :]) * (PER // 4)
            x0, x1, x2, x3 = _x_quad(xq, c, j, K, 0, PER, EVEN)
            x4, x5, x6, x7 = x0, x1, x2, x3
            if PER == 8:
                x4, x5, x6, x7 = _x_quad(xq, c, j, K, 1, PER, EVEN)
        else:
            xp = X + m * s_xm + (c[:, None] * 4 + j[None, :]) * PER
            x0 = _x_tile(xp, c, j, K, 0, PER, EVEN)
            x1 = _x_tile(xp, c, j, K, 1, PER, EVEN)
            x2 = _x_tile(xp, c, j, K, 2, PER, EVEN)
            x3 = _x_tile(xp, c, j, K, 3, PER, EVEN)
            x4, x5, x6, x7 = x0, x1, x2, x3
            if PER == 8:
                x4 = _x_tile(xp, c, j, K, 4, PER, EVEN)
                x5 = _x_tile(xp, c, j, K, 5, PER, EVEN)
                x6 = _x_tile(xp, c, j, K, 6, PER, EVEN)
                x7 = _x_tile(xp, c, j, K, 7, PER, EVEN)
        xc, xe = _x_sums(x0, x1, x2, x3, x4, x5, x6, x7, PER)
        for tile in range(tl.program_id(1), tl.cdiv(N, ROWS), tl.num_programs(1)):
            n0 = tile * ROWS
            acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            for row in tl.static_range(ROWS):
                n = tl.minimum(n0 + row, N - 1).to(tl.int64)
                wp = Q + n * (4 * C) + c[:, None] * 4 + j[None, :]
                sp = S + n * G + c // CPG
                zp = Z + n * G + c // CPG
                if EVEN:
                    w = tl.load(wp)
                    sc = tl.load(sp).to(tl.float32)
                else:
                    w = tl.load(wp, mask=(c < C)[:, None], other=0)
                    sc = tl.load(sp, mask=c < C, other=0.0).to(tl.float32)
                zc = _load_z(zp, sc, c < C, EVEN, SYM)
                t = _row_terms(w, sc, zc, x0, x1, x2, x3, x4, x5, x6, x7, xc, xe, MAGIC, BITS, PAIR)
                acc = tl.where((r == row)[:, None], acc + t[None, :], acc)
            n = n0 + r
            tl.store(Y + m * s_ym + n, tl.sum(acc, axis=1).to(Y.dtype.element_ty), mask=n < N)

    @triton.jit
    def _dequant_w4_kernel(Q, S, Z, W, K, KB, G, BLOCK_G: tl.constexpr):
        # one program per (row, BLOCK_G groups): W[n, 32g + j] = (q - z) * s
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BG]
        j = tl.arange(0, 16)
        gm = g < G
        q = tl.load(Q + n * KB + g[:, None] * 16 + j[None, :], mask=gm[:, None], other=0)  # [BG, 16]
        s = tl.load(S + n * G + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        z = tl.load(Z + n * G + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        lo = ((q & 15).to(tl.float32) - z) * s
        hi = ((q >> 4).to(tl.float32) - z) * s
        w = tl.reshape(tl.join(lo, hi), [BLOCK_G, 32])  # [BG, 16, 2] -> elements 2j, 2j+1 interleaved
        col = g[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(W + n * K + col, w.to(W.dtype.element_ty), mask=gm[:, None] & (col < K))


if HAVE_TRITON:

    @triton.jit
    def _dequant_w8_kernel(
        Q, S, OFF, W, K, KP, G, BLOCK_G: tl.constexpr, GS: tl.constexpr = 32, SYM: tl.constexpr = False
    ):
        # one program per (row, BLOCK_G groups): W[n, GS g + j] = q * s + o (SYM: o = -128 s)
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BG]
        gm = g < G
        col = g[:, None] * GS + tl.arange(0, GS)[None, :]  # [BG, GS]
        q = tl.load(Q + n * KP + col, mask=gm[:, None], other=0).to(tl.float32)
        s = tl.load(S + n * G + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        o = _load_z(OFF + n * G + g[:, None], s, gm[:, None], False, SYM)
        tl.store(W + n * K + col, (q * s + o).to(W.dtype.element_ty), mask=gm[:, None] & (col < K))


@functools.cache
def _programs(device: torch.device, per_sm: int) -> int:
    """Programs of a persistent launch: `per_sm` per multiprocessor (the interpreter: 2)."""
    if device.type != "cuda":
        return 2
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def usable(x: torch.Tensor) -> bool:
    """The GPU kernels apply to this activation: CUDA (or the interpreter's CPU tensors in tests), float."""
    return ENABLED and HAVE_TRITON and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _variant(variant: list) -> tuple[str, bool]:
    """A tiling's kernel ("bytes" for 3-tuples) and whether it reads x in 2-byte loads (a "-sx" suffix; a
    "-rN" suffix after it caps registers: `_launch_opts`)."""
    name = (variant[0] if variant else "bytes").partition("-r")[0]
    return name.removesuffix("-sx"), name.endswith("-sx")


def _launch_opts(cfg: tuple) -> dict:
    """A word tiling's launch options: a "-rN" suffix on its kernel's name caps its registers at N a thread
    (Triton's `maxnreg`). The int4 "rows2" tiling (8, 64, 2) needs 167 for sm_90 (ptxas through Triton 3.9 on
    the CPU machine), so 12 of an SM's 64 warps fit; at 128 16 fit, for 20 spill instructions a step
    (benchmarks/quant_kernels.py sweeps both)."""
    regs = cfg[3].partition("-r")[2] if len(cfg) > 3 else ""
    return {"maxnreg": int(regs)} if regs else {}


def _x_words(x: torch.Tensor, k: int, scalar: bool) -> tuple[torch.Tensor, int, bool]:
    """The word kernels' input: bf16 x as int64 (4 values each: `_x_quad`) where its rows allow, with its row
    stride in int64s; else x itself (2-byte loads) -> (tensor, row stride, packed)."""
    if (
        scalar
        or x.dtype != torch.bfloat16
        or k % 4
        or x.stride(0) % 4
        or x.data_ptr() % 8
        or x.stride(-1) != 1
    ):
        return x, x.stride(0), False
    return x.view(torch.int64), x.stride(0) // 4, True


def _gemv_words(
    name: str, scalar_x: bool, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
    y: torch.Tensor, idx: torch.Tensor | None, rpt: int, k: int, bits: int, cfg: tuple,
) -> None:  # fmt: skip
    """Launch the word GEMVs ("rows", "rows2", "persist", "persist2", "words") into y (z None: a symmetric
    int8 weight, its offsets -128 s)."""
    (N, KP), G, M = q.shape[-2:], s.shape[-1], y.shape[0]
    sym, z = z is None, s if z is None else z  # (SYM: the kernels never read z)
    bn, b, warps, *variant = cfg
    ex = idx is not None
    qw = q.view(torch.int32)
    if name == "words":
        kern, gs = (_gemv_w4w_kernel, {}) if bits == 4 else (_gemv_w8w_kernel, {"GS": KP // G, "SYM": sym})
        with on_device(x.device):
            kern[(M, triton.cdiv(N, bn))](
                x, qw, s, z, y, idx if ex else x, N, k, G, x.stride(0), y.stride(0),
                qw.stride(0) if ex else 0, s.stride(0) if ex else 0, rpt,
                BLOCK_N=bn, BLOCK_G=b, EVEN=G % b == 0 and (KP if bits == 8 else 32 * G) == k, EXPERTS=ex,
                num_warps=warps, **gs,
            )  # fmt: skip
        return
    gs = 32 if bits == 4 else KP // G
    chunks = G * gs // (32 // bits) // 4  # 16-byte chunks a row
    whole = (32 * G if bits == 4 else KP) == k  # no padding past the input
    pair = bits == 4 and name in ("rows2", "persist2")
    xin, sx, xpack = _x_words(x, k, scalar_x)
    if name in ("persist", "persist2") and not ex and chunks <= b:  # (else the rows kernel: x takes >1 step)
        with on_device(x.device):
            _gemv_persist_kernel[(M, min(triton.cdiv(N, bn), _programs(x.device, variant[1])))](
                xin, qw, s, z, y, N, k, G, sx, y.stride(0), ONE_BITS,
                ROWS=bn, BLOCK_C=b, EVEN=chunks == b and whole, BITS=bits, GS=gs, PAIR=pair, XPACK=xpack,
                SYM=sym, num_warps=warps, **_launch_opts(cfg),
            )  # fmt: skip
        return
    with on_device(x.device):
        _gemv_rows_kernel[(M, triton.cdiv(N, bn))](
            xin, qw, s, z, y, idx if ex else x, N, k, G, sx, y.stride(0),
            qw.stride(0) if ex else 0, s.stride(0) if ex else 0, rpt, ONE_BITS,
            ROWS=bn, BLOCK_C=b, EVEN=chunks % b == 0 and whole, EXPERTS=ex, BITS=bits, GS=gs, PAIR=pair,
            XPACK=xpack, SYM=sym, num_warps=warps, **_launch_opts(cfg),
        )  # fmt: skip


def gemv_w4(
    x: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    k: int,
    cfg: tuple | None = None,
    idx: torch.Tensor | None = None,
    rpt: int = 1,
) -> torch.Tensor:
    """x: [M, k] (last dim contiguous), q: uint8 [N, G*16], s, z: [N, G] -> [M, N] in x's dtype.
    Experts (MoE): q, s, z stacked [E, ...] and idx [P] (int64): row p of the [P, N] output is
    x[p // rpt] @ expert idx[p]'s W^T. cfg: a tiling of `W4_CFGS` (for benchmarks)."""
    (N, KB), G = q.shape[-2:], s.shape[-1]
    M = x.shape[0] if idx is None else idx.numel()
    cfg = cfg or W4_CFGS[shape_class(N, k)]
    bn, bkb, warps, *variant = cfg
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ex = idx is not None
    name, scalar_x = _variant(variant)
    if name != "bytes":
        _gemv_words(name, scalar_x, x, q, s, z, y, idx, rpt, k, 4, cfg)
        return y
    with on_device(x.device):
        _gemv_w4_kernel[(M, triton.cdiv(N, bn))](
            x, q, s, z, y, idx if ex else x, N, k, KB, G, x.stride(0), y.stride(0),
            q.stride(0) if ex else 0, s.stride(0) if ex else 0, rpt,
            BLOCK_N=bn, BLOCK_KB=bkb, EVEN=KB % bkb == 0 and 2 * KB == k, EXPERTS=ex, num_warps=warps,
        )  # fmt: skip
    return y


def gemv_w8(
    x: torch.Tensor,
    q: torch.Tensor,
    s: torch.Tensor,
    o: torch.Tensor | None,
    cfg: tuple | None = None,
    idx: torch.Tensor | None = None,
    rpt: int = 1,
) -> torch.Tensor:
    """x: [M, K] (last dim contiguous), q: uint8 [N, 32 G] (K zero-padded to whole groups of 32; or of 16:
    [N, 16 G], a GGUF's Q6_K kept on a GPU), s, o: [N, G] (w = q s + o per group; o None: symmetric,
    w = s (q - 128)) -> [M, N] in x's dtype.
    Experts: q, s, o stacked [E, ...], idx and rpt as in gemv_w4. cfg: a tiling of `W8_CFGS` (for
    benchmarks; the byte kernel's steps a multiple of 32 weights)."""
    (N, KP), G, K = q.shape[-2:], s.shape[-1], x.shape[-1]
    M = x.shape[0] if idx is None else idx.numel()
    cfg = cfg or W8_CFGS[shape_class(N, K)]
    bn, bk, warps, *variant = cfg
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ex = idx is not None
    name, scalar_x = _variant(variant)
    if name != "bytes":
        _gemv_words(name, scalar_x, x, q, s, o, y, idx, rpt, K, 8, cfg)
        return y
    with on_device(x.device):
        _gemv_w8_kernel[(M, triton.cdiv(N, bn))](
            x, q, s, s if o is None else o, y, idx if ex else x, N, K, KP, G, x.stride(0), y.stride(0),
            q.stride(0) if ex else 0, s.stride(0) if ex else 0, rpt,
            BLOCK_N=bn, BLOCK_K=bk, EVEN=KP % bk == 0 and KP == K, EXPERTS=ex, GS=KP // G, SYM=o is None,
            num_warps=warps,
        )  # fmt: skip
    return y


def dequant_w8(
    q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """q: uint8 [N, 32 G] (or [N, 16 G]), s, o: [N, G] -> W [N, k] in `dtype` (each weight q s + o in f32,
    rounded once; o None: symmetric, o = -128 s)."""
    (N, KP), G = q.shape, s.shape[1]
    w = torch.empty(N, k, dtype=dtype, device=q.device)
    BG = 32
    with on_device(q.device):
        _dequant_w8_kernel[(N, triton.cdiv(G, BG))](
            q, s, s if o is None else o, w, k, KP, G, BLOCK_G=BG, GS=KP // G, SYM=o is None, num_warps=4
        )
    return w


def dequant_w4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """q: uint8 [N, G*16], s, z: [N, G] -> W [N, k] in `dtype`."""
    (N, KB), G = q.shape, s.shape[1]
    w = torch.empty(N, k, dtype=dtype, device=q.device)
    BG = 32
    with on_device(q.device):
        _dequant_w4_kernel[(N, triton.cdiv(G, BG))](q, s, z, w, k, KB, G, BLOCK_G=BG, num_warps=4)
    return w

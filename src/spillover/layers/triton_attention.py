"""Paged decode attention as one Triton kernel (CUDA): reads each sequence's K/V straight from its cache slots.

Replaces, per layer and decode step, two gathers of the whole context plus SDPA's kernels with one launch.
One program per (sequence, kv head[, context chunk]) computes all the query heads of that kv head's group with
an online softmax over its tokens in blocks of BLOCK_N; long contexts are split into chunks whose results a
second kernel combines (flash-decoding), so that a batch of one still fills the GPU.
"""

from __future__ import annotations

import torch

from spillover.layers.triton_fused import HAVE_TRITON, on_device

if HAVE_TRITON:  # layers/triton_fused.py decides (a CUDA device or the interpreter, and triton installed)
    import triton
    import triton.language as tl

    # s_sb is the padded context length L of the step: Triton would compile a variant for the first L that is a
    # multiple of 16, inside a request (eager decode: MoE layers with CPU experts, contexts past the graphs)
    @triton.jit(do_not_specialize=["s_sb"])
    def _decode_kernel(
        Q, K, V, Slots, Lens, Out, Lse, scale, SPLIT,
        s_qb, s_qh, s_kn, s_kh, s_sb, s_ob, s_oh, s_os,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)  # which SPLIT-token chunk of the context (flash-decoding); 0 when SPLITS == 1
        length = tl.load(Lens + b)
        lo = sp * SPLIT
        hi = tl.minimum(lo + SPLIT, length)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, HD)
        gmask = g < GROUP
        q = tl.load(
            Q + b * s_qb + (kvh * GROUP + g)[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0
        )
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, HD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < hi
            slot = tl.load(Slots + b * s_sb + n, mask=nmask, other=0).to(tl.int64)
            k = tl.load(K + slot[:, None] * s_kn + kvh * s_kh + d[None, :], mask=nmask[:, None], other=0.0)
            v = tl.load(V + slot[:, None] * s_kn + kvh * s_kh + d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [GROUP_P, BLOCK_N]
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            den = den * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m = m_new
        heads = kvh * GROUP + g
        if SPLITS == 1:
            out = acc / den[:, None]
            tl.store(Out + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(Out.dtype.element_ty),
                     mask=gmask[:, None])  # fmt: skip
        else:  # partial result of this chunk, normalised, and its log-sum-exp (-inf for an empty chunk)
            empty = den == 0.0
            out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, den)[:, None])
            lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, den)))
            tl.store(
                Out + b * s_ob + heads[:, None] * s_oh + sp * s_os + d[None, :], out, mask=gmask[:, None]
            )
            tl.store(Lse + (b * GROUP * tl.num_programs(1) + heads) * SPLITS + sp, lse, mask=gmask)

    @triton.jit
    def _combine_kernel(
        Part, Lse, Out, s_pb, s_ph, s_ps, s_ob, s_oh, NH, SPLITS: tl.constexpr, HD: tl.constexpr
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, HD)
        lse = tl.load(Lse + (b * NH + h) * SPLITS + sp)  # [SPLITS]
        w = tl.exp(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        part = tl.load(Part + b * s_pb + h * s_ph + sp[:, None] * s_ps + d[None, :])  # [SPLITS, HD]
        out = tl.sum(part * w[:, None], 0)
        tl.store(Out + b * s_ob + h * s_oh + d, out.to(Out.dtype.element_ty))


def usable(q: torch.Tensor) -> bool:
    hd = q.shape[-1]
    return HAVE_TRITON and q.is_cuda and hd in (64, 128, 256) and q.dtype in (torch.bfloat16, torch.float16)


# flash-decoding: with few (sequence, kv head) programs and a long context, each program would walk the whole
# context alone (8 programs on a 132-SM H100 at batch 1); above MIN_SPLIT_LEN tokens the context is cut into
# chunks so that about TARGET_PROGRAMS programs run, and a second kernel combines the chunks' results
MIN_SPLIT_LEN = 512
TARGET_PROGRAMS = 256
BLOCK_N = 64


def num_splits(batch: int, kv_heads: int, max_len: int) -> int:
    """Chunks per (sequence, kv head): a power of two (a Triton block size), 1 for short contexts."""
    if max_len < MIN_SPLIT_LEN:
        return 1
    want = min(-(-TARGET_PROGRAMS // (batch * kv_heads)), -(-max_len // (2 * BLOCK_N)))
    return 1 if want <= 1 else min(triton.next_power_of_2(want), 64)


def paged_decode(
    q: torch.Tensor,  # [B, nh, hd]
    k_cache: torch.Tensor,  # [S, nkv, hd]
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [B, L] cache slot of each context position (padded past each length)
    lens: torch.Tensor,  # [B] context length of each sequence (int32/int64)
    scale: float,
) -> torch.Tensor:  # [B, nh, hd]
    B, nh, hd = q.shape
    nkv = k_cache.shape[1]
    group = nh // nkv
    L = slots.shape[1]  # static for a CUDA graph: the split depends on shapes only
    splits = num_splits(B, nkv, L)
    split = -(-L // (splits * BLOCK_N)) * BLOCK_N  # tokens per chunk, whole blocks
    out = torch.empty_like(q)
    part, lse = out, out  # unused when splits == 1
    if splits > 1:
        part = torch.empty(B, nh, splits, hd, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, nh, splits, dtype=torch.float32, device=q.device)
    dst = part if splits > 1 else out
    with on_device(q.device):  # Triton launches on the current device, which need not be the tensors' one
        _decode_kernel[(B, nkv, splits)](
            q, k_cache, v_cache, slots, lens, dst, lse, scale, split,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), slots.stride(0), dst.stride(0),
            dst.stride(1), dst.stride(2) if splits > 1 else 0,
            GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK_N=BLOCK_N, SPLITS=splits,
        )  # fmt: skip
        if splits > 1:
            _combine_kernel[(B, nh)](
                part, lse, out, part.stride(0), part.stride(1), part.stride(2), out.stride(0), out.stride(1), nh,
                SPLITS=splits, HD=hd,
            )  # fmt: skip
    return out

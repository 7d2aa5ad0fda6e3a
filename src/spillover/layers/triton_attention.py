"""Paged decode attention as one Triton kernel (CUDA): reads each sequence's K/V straight from its cache slots.

Replaces, per layer and decode step, two gathers of the whole context plus SDPA's kernels with one launch.
One program per (sequence, kv head) computes all the query heads of that kv head's group with an online
softmax over the context in chunks of BLOCK_N tokens.
"""

from __future__ import annotations

import torch

from spillover.layers.triton_fused import on_device

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _decode_kernel(
        Q, K, V, Slots, Lens, Out, scale,
        s_qb, s_qh, s_kn, s_kh, s_sb, s_ob, s_oh,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        length = tl.load(Lens + b)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, HD)
        gmask = g < GROUP
        q = tl.load(
            Q + b * s_qb + (kvh * GROUP + g)[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0
        )
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, HD], tl.float32)
        for start in range(0, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < length
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
        out = acc / den[:, None]
        tl.store(Out + b * s_ob + (kvh * GROUP + g)[:, None] * s_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=gmask[:, None])  # fmt: skip


def usable(q: torch.Tensor) -> bool:
    hd = q.shape[-1]
    return HAVE_TRITON and q.is_cuda and hd in (64, 128, 256) and q.dtype in (torch.bfloat16, torch.float16)


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
    out = torch.empty_like(q)
    with on_device(q.device):  # Triton launches on the current device, which need not be the tensors' one
        _decode_kernel[(B, nkv)](
            q, k_cache, v_cache, slots, lens, out, scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), slots.stride(0), out.stride(0), out.stride(1),
            GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HD=hd, BLOCK_N=64,
        )  # fmt: skip
    return out

"""Attention over a paged KV cache, with torch SDPA, on any device.

The cache of one layer is a pair of tensors [num_slots, kv_heads, head_dim] (num_slots = blocks x block
size); a sequence's tokens live in the slots its block table names. Each step, the new tokens' K/V are
written to their slots, then each sequence attends to all of its slots:
- decode (1 query token): all decoding sequences in one SDPA call over gathered, padded K/V;
- prefill chunk: one SDPA call per sequence; a chunk with no past uses the fresh K/V and is_causal. A chunk
  with a past (full attention) attends causally aligned to the bottom right; on a GPU that is passed as
  torch's `causal_lower_right` bias, so flash attention runs with grouped KV heads, instead of the boolean
  mask, which only the memory-efficient kernel takes, and only with K/V expanded to every query head (4x the
  gathered K/V of a Llama-3 layer: 512 MiB at a 32k context, which the planner does not count).

Sliding-window layers keep a ring of slots per sequence (the runner numbers them): a chunk's past is read
from the ring before the chunk's own K/V overwrite it (`PrefillSlice.fresh`), and the chunk attends to
that past followed by its own K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spillover.layers import cpu_linear, triton_attention, triton_fused
from spillover.layers.rotary import apply_rotary


@dataclass
class PrefillSlice:
    start: int  # first row of this sequence in the step's token dimension
    q_len: int
    ctx_len: int  # tokens in the cache after this step (past + q_len)
    slots: torch.Tensor | None  # [ctx_len] cache slots to attend to; None when there is no past
    # [q_len, ctx_len] bool, True = attend (sliding-window chunks); None with no past (is_causal) and for full
    # attention with a past, which is causal to the bottom right (`_lower_right`, built only where needed)
    mask: torch.Tensor | None
    fresh: bool = False  # slots hold the past only (read before this step's write), then the chunk's own K/V


@dataclass
class AttnMeta:
    """Per-step attention metadata, on one device (built once per step per device)."""

    slot_mapping: torch.Tensor  # [T] cache slot for each new token
    decode_rows: torch.Tensor | None  # [Bd] rows of decoding sequences in the token dimension
    decode_slots: torch.Tensor | None  # [Bd, Lmax] cache slots per decoding sequence (padded)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Lmax] bool, None when all lengths are equal
    prefills: list[PrefillSlice]
    all_decode_rows_contiguous: bool = False  # decode rows are exactly 0..Bd-1
    decode_lens: torch.Tensor | None = None  # [Bd] int32 context lengths (Triton decode, CPU decode layer)

    @property
    def reads_before_write(self) -> bool:
        """A prefill chunk reads slots its own K/V will overwrite (sliding-window rings)."""
        return any(p.fresh and p.slots is not None for p in self.prefills)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta
) -> None:
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)


def rope_attention(
    qk: torch.Tensor,  # [T, n_heads + n_kv, hd] q and k, not rotated yet
    v: torch.Tensor,  # [T, n_kv, hd]
    n_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMeta,
    scale: float,
) -> torch.Tensor:  # [T, n_heads, hd]
    """Rotate q and k, write k and v to the layer's cache and attend: what every decoder layer does. On CUDA
    one kernel rotates and writes (unless a chunk must read its ring before writing)."""
    fused = triton_fused.usable(qk, v, cos, sin, k_cache, v_cache) and not meta.reads_before_write
    if fused:  # q, k rotated in place, k and v written to the cache
        q, k = qk.split([n_heads, qk.shape[1] - n_heads], dim=1)
        triton_fused.rope_and_cache(q, k, v, cos, sin, meta.slot_mapping, k_cache, v_cache)
    else:
        q, k = apply_rotary(qk, cos, sin).split([n_heads, qk.shape[1] - n_heads], dim=1)
    return paged_attention(q, k, v, k_cache, v_cache, meta, scale, kv_written=fused)


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, hd]
    k: torch.Tensor,  # [T, n_kv, hd]
    v: torch.Tensor,  # [T, n_kv, hd]
    k_cache: torch.Tensor,  # [S, n_kv, hd]
    v_cache: torch.Tensor,
    meta: AttnMeta,
    scale: float,
    kv_written: bool = False,  # the caller already wrote k, v to the cache (fused rope + cache write)
) -> torch.Tensor:  # [T, n_heads, hd]
    past = {}  # prefill slices whose past is read before this step's K/V are written (rings)
    for i, p in enumerate(meta.prefills):
        if p.fresh and p.slots is not None:
            past[i] = (k_cache[p.slots], v_cache[p.slots])  # [n_past, nkv, hd] copies
    if not kv_written:
        write_kv(k_cache, v_cache, k, v, meta)
    if meta.decode_rows is not None and not meta.prefills and meta.all_decode_rows_contiguous:
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _decode(q[meta.decode_rows], k_cache, v_cache, meta, scale)
    for i, p in enumerate(meta.prefills):
        qs = q[p.start : p.start + p.q_len].transpose(0, 1)[None]  # [1, nh, ql, hd]
        if p.slots is None or p.fresh:
            ks = k[p.start : p.start + p.q_len]  # [ql, nkv, hd]
            vs = v[p.start : p.start + p.q_len]
            if i in past:
                ks, vs = torch.cat([past[i][0], ks]), torch.cat([past[i][1], vs])
            ks, vs = ks.transpose(0, 1)[None], vs.transpose(0, 1)[None]  # [1, nkv, ctx, hd]
            o = _sdpa(qs, ks, vs, p.mask, scale, causal=p.mask is None)
        else:
            ks = k_cache[p.slots].transpose(0, 1)[None]  # [1, nkv, ctx, hd]
            vs = v_cache[p.slots].transpose(0, 1)[None]
            if q.is_cuda and q.dtype != torch.float32:  # flash: bottom-right causal, grouped KV heads
                # (imported here: torch.nn.attention.bias imports torch._dynamo, 1.3 s and 150 MiB of RSS)
                from torch.nn.attention.bias import causal_lower_right

                bias = causal_lower_right(p.q_len, p.ctx_len)
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, bias, scale=scale, enable_gqa=qs.shape[1] != ks.shape[1]
                )
            else:
                o = _sdpa(qs, ks, vs, _lower_right(p.q_len, p.ctx_len, q.device), scale)
        out[p.start : p.start + p.q_len] = o[0].transpose(0, 1)
    return out


def _lower_right(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, ctx_len] bool: query i (position ctx_len - q_len + i) attends to keys 0..its position."""
    return torch.ones(q_len, ctx_len, dtype=torch.bool, device=device).tril_(ctx_len - q_len)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMeta, scale: float):
    if meta.decode_lens is not None and triton_attention.usable(q):
        return triton_attention.paged_decode(q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, scale)
    if q.device.type == "cpu":  # the C kernel reads K/V in place (no gathered copies)
        o = cpu_linear.decode_attention(q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, scale)
        if o is not None:
            return o
    ks = k_cache[meta.decode_slots].transpose(1, 2)  # [B, nkv, L, hd]
    vs = v_cache[meta.decode_slots].transpose(1, 2)
    if not q.is_cuda:
        return _cpu_decode_attention(q, ks, vs, meta.decode_mask, scale)
    qs = q[:, :, None, :]  # [B, nh, 1, hd]
    o = _sdpa(qs, ks, vs, meta.decode_mask, scale)
    return o[:, :, 0, :]  # [B, nh, hd]


def _cpu_decode_attention(
    q: torch.Tensor,  # [B, nh, hd]
    k: torch.Tensor,  # [B, nkv, L, hd]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # [B, 1, 1, L] bool, True = attend
    scale: float,
) -> torch.Tensor:  # [B, nh, hd]
    """One query per sequence on the CPU: two f32 matmuls over the grouped heads. torch's CPU SDPA (its flash
    kernel) is built for blocks of queries: for one query it took 10x longer in bf16 (2.8 ms against 0.32 at
    200 keys, 27.5 against 3.6 at 2000, one thread), the largest cost of a CPU-computed layer's decode step
    after its weights."""
    B, nh, hd = q.shape
    nkv = k.shape[1]
    qg = q.reshape(B, nkv, nh // nkv, hd).float()  # [B, nkv, rep, hd]: query heads grouped by their KV head
    s = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale)  # [B, nkv, rep, L]
    if mask is not None:
        s.masked_fill_(~mask.view(B, 1, 1, -1), float("-inf"))
    o = torch.matmul(torch.softmax(s, dim=-1), v.float())  # [B, nkv, rep, hd]
    return o.reshape(B, nh, hd).to(q.dtype)


# CUDA attention backends: not cuDNN, which builds an execution plan for each new shape (H100: ~90 ms for each
# new prompt length, ~1 s for the first), a cost a server with varied prompts pays again and again
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(
    q: torch.Tensor,  # [B, nh, Lq, hd]
    k: torch.Tensor,  # [B, nkv, Lk, hd]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool, True = attend
    scale: float,
    causal: bool = False,
) -> torch.Tensor:  # [B, nh, Lq, hd]
    gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    if gqa and mask is not None:  # the memory-efficient kernel takes a mask but not grouped kv heads
        B, nkv, L, hd = k.shape
        rep = q.shape[1] // nkv
        k = k[:, :, None].expand(B, nkv, rep, L, hd).reshape(B, nkv * rep, L, hd)
        v = v[:, :, None].expand(B, nkv, rep, L, hd).reshape(B, nkv * rep, L, hd)
        gqa = False
    with sdpa_kernel(_CUDA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=gqa)

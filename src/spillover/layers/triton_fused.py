"""Fused element-wise kernels for CUDA decode (Triton): RMSNorm (+ residual add), rope + KV-cache write, SiLU-mul.

Decode at batch 1 is launch-bound outside the matmuls: these replace 12 of the 13 small torch kernels of a layer
with 4 launches (the residual add at the layer's end stays a torch add: layers map x -> x).
All math is in fp32 and rounded once to the tensor dtype (the torch path rounds after every op in bf16, so the
two differ by an ulp here and there). The model code dispatches here only for CUDA tensors (`usable`); CPU keeps
the torch ops. The wrappers themselves take any tensors Triton can launch on, CPU ones under TRITON_INTERPRET=1
(how the tests run them without a GPU).
"""

from __future__ import annotations

import contextlib
import os

import torch

TRITON_WANTED = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
"""Triton is imported only where its kernels can run: a CUDA device, or its CPU interpreter (tests). Without
them the import only costs start-up time and ~75 MiB of resident memory."""

try:
    if not TRITON_WANTED:
        raise ImportError("no CUDA device")
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs and machines
    HAVE_TRITON = False

ENABLED = True  # switch for comparing against the torch path on a GPU
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


if HAVE_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Out, H, eps, N, D1,
        s_x0, s_x1, s_r0, s_r1, s_h0, s_h1,
        HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        i0, i1 = row // D1, row % D1  # rows of a [T, H] or [T, D1, H] input
        c = tl.arange(0, BLOCK)
        mask = c < N
        x = tl.load(X + i0 * s_x0 + i1 * s_x1 + c, mask=mask, other=0.0)
        if HAS_RES:  # h = x + residual, rounded to the input dtype like torch's add
            r = tl.load(R + i0 * s_r0 + i1 * s_r1 + c, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(H + i0 * s_h0 + i1 * s_h1 + c, x, mask=mask)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * N + c, (x * rstd * w).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate(X, Cos, Sin, d, HALF: tl.constexpr):
        """Rotate-half rope of one head at X (first 2 HALF channels); returns both rotated halves, fp32."""
        m = d < HALF
        x1 = tl.load(X + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + HALF + d, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(Cos + d, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(Cos + HALF + d, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(Sin + d, mask=m, other=0.0).to(tl.float32)  # the table's first half is -sin
        s2 = tl.load(Sin + HALF + d, mask=m, other=0.0).to(tl.float32)
        return x1 * c1 + x2 * s1, x2 * c2 + x1 * s2

    @triton.jit
    def _rope_cache_kernel(
        Q, K, V, Cos, Sin, Slots, KC, VC,
        s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ct, s_st, s_kcn, s_kch, s_vcn, s_vch,
        NH: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
        HD_P: tl.constexpr, PARTIAL: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)  # 0..NH-1: a query head; NH..: a kv head (k rotated + k, v written to the cache)
        d = tl.arange(0, HALF_P)
        cos, sin = Cos + t * s_ct, Sin + t * s_ct
        m = d < HALF
        if h < NH:
            q = Q + t * s_qt + h * s_qh
            o1, o2 = _rotate(q, cos, sin, d, HALF)
            tl.store(q + d, o1.to(Q.dtype.element_ty), mask=m)
            tl.store(q + HALF + d, o2.to(Q.dtype.element_ty), mask=m)
        else:
            kh = h - NH
            k = K + t * s_kt + kh * s_kh
            slot = tl.load(Slots + t * s_st).to(tl.int64)
            kc = KC + slot * s_kcn + kh * s_kch
            # not o1, o2 as above: a name keeps one type across the branches of an `if` in Triton
            r1, r2 = _rotate(k, cos, sin, d, HALF)
            k1, k2 = r1.to(K.dtype.element_ty), r2.to(K.dtype.element_ty)
            tl.store(k + d, k1, mask=m)
            tl.store(k + HALF + d, k2, mask=m)
            tl.store(kc + d, k1.to(KC.dtype.element_ty), mask=m)
            tl.store(kc + HALF + d, k2.to(KC.dtype.element_ty), mask=m)
            e = tl.arange(0, HD_P)
            if PARTIAL:  # channels past the rotary dims pass through to the cache
                pm = (e >= 2 * HALF) & (e < HD)
                tl.store(kc + e, tl.load(k + e, mask=pm).to(KC.dtype.element_ty), mask=pm)
            em = e < HD
            v = tl.load(V + t * s_vt + kh * s_vh + e, mask=em)
            tl.store(VC + slot * s_vcn + kh * s_vch + e, v.to(VC.dtype.element_ty), mask=em)

    @triton.jit
    def _silu_mul_kernel(X, Out, N, s_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < N
        g = tl.load(X + row * s_x + c, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * s_x + N + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * N + c, (g / (1.0 + tl.exp(-g)) * u).to(Out.dtype.element_ty), mask=mask)


def usable(*ts: torch.Tensor) -> bool:
    """The fused kernels apply: Triton present, every tensor on CUDA, a float dtype, the last dim contiguous."""
    return (
        ENABLED
        and HAVE_TRITON
        and all(t.is_cuda and t.dtype in DTYPES and t.stride(-1) == 1 for t in ts)
        and len({t.device for t in ts}) == 1
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] or [T, D1, H] (last dim contiguous) -> rmsnorm(x) * weight, contiguous.
    With `residual` (x's shape): h = x + residual first; returns (rmsnorm(h) * weight, h)."""
    N = x.shape[-1]
    D1 = x.shape[1] if x.dim() == 3 else 1
    s_x0, s_x1 = x.stride(0), x.stride(1) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    r = h = x  # placeholders, unused without a residual
    s_r0 = s_r1 = s_h0 = s_h1 = 0
    if residual is not None:
        r, h = residual, torch.empty_like(out)
        s_r0, s_r1 = r.stride(0), r.stride(1) if r.dim() == 3 else 0
        s_h0, s_h1 = h.stride(0), h.stride(1) if h.dim() == 3 else 0
    BLOCK = triton.next_power_of_2(N)
    with on_device(x.device):  # Triton launches on the current device, which need not be the tensors' one
        _rms_norm_kernel[(x.shape[0] * D1,)](
            x, r, weight, out, h, eps, N, D1, s_x0, s_x1, s_r0, s_r1, s_h0, s_h1,
            HAS_RES=residual is not None, BLOCK=BLOCK, num_warps=min(max(BLOCK // 512, 1), 8),
        )  # fmt: skip
    return out if residual is None else (out, h)


def rope_and_cache(
    q: torch.Tensor,  # [T, nh, hd], rotated in place (a strided view is fine: last dim contiguous)
    k: torch.Tensor,  # [T, nkv, hd], rotated in place
    v: torch.Tensor,  # [T, nkv, hd]
    cos: torch.Tensor,  # [T, rot_dim] from Rotary.cos_sin (rot_dim <= hd, even)
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] cache slot of each token
    k_cache: torch.Tensor,  # [S, nkv, hd]: rotated k written at slot_mapping
    v_cache: torch.Tensor,  # [S, nkv, hd]: v written at slot_mapping
) -> None:
    """Rope on the first rot_dim channels of q and k (x * cos + roll(x, rot_dim / 2) * sin, in fp32) and the
    KV-cache write, in one launch: one program per (token, head) over nh + nkv heads."""
    T, nh, hd = q.shape
    nkv, rot = k.shape[1], cos.shape[-1]
    assert cos.stride() == sin.stride() and rot % 2 == 0 and rot <= hd
    if T == 0:
        return
    with on_device(q.device):  # Triton launches on the current device, which need not be the tensors' one
        _rope_cache_kernel[(T, nh + nkv)](
            q, k, v, cos, sin, slot_mapping, k_cache, v_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            slot_mapping.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            NH=nh, HD=hd, HALF=rot // 2, HALF_P=triton.next_power_of_2(rot // 2), HD_P=triton.next_power_of_2(hd),
            PARTIAL=rot < hd, num_warps=1,
        )  # fmt: skip


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate | up, last dim contiguous) -> silu(gate) * up: [T, I], fp32 math."""
    T, N = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    BLOCK = min(1024, triton.next_power_of_2(N))
    with on_device(x.device):  # Triton launches on the current device, which need not be the tensors' one
        _silu_mul_kernel[(T, triton.cdiv(N, BLOCK))](x, out, N, x.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The device guard for a kernel launch (a no-op on the CPU, where the interpreter runs kernels)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

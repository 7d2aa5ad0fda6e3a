"""Fused Triton kernels (layers/triton_fused.py) against the torch ops they replace.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1 before
spillover is imported): f32 and f16 only, the interpreter gets bf16 wrong. On a GPU they run on CUDA, and the
`gpu` tests add bf16 and a whole model against the unfused torch path.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from spillover.layers import triton_fused  # noqa: E402
from spillover.layers.rotary import apply_rotary  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

kernels = pytest.mark.skipif(
    DEV == "cpu" and type(triton_fused._silu_mul_kernel).__name__ != "InterpretedFunction",
    reason="no CUDA and the kernels were not defined under TRITON_INTERPRET=1",
)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    err = ((got.float() - want.float()).abs() / (1 + want.float().abs())).max().item()
    assert err <= TOL[dtype], err  # relative past 1, absolute below


def check_rms_norm(dtype: torch.dtype, dev: str, T: int, H: int, residual: bool) -> None:
    g = torch.Generator().manual_seed(T * H)
    x = torch.randn(T, H, generator=g).to(dev, dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dev, dtype)
    if not residual:
        close(triton_fused.rms_norm(x, w, 1e-6), F.rms_norm(x.float(), (H,), w.float(), 1e-6), dtype)
        return
    r = torch.randn(T, H, generator=g).to(dev, dtype)
    out, h = triton_fused.rms_norm(x, w, 1e-6, r)
    assert torch.equal(h, x + r)  # rounded to the dtype once, like torch's add
    close(out, F.rms_norm(h.float(), (H,), w.float(), 1e-6), dtype)


def check_rope_and_cache(dtype: torch.dtype, dev: str, T: int, nh: int, nkv: int, hd: int, rot: int) -> None:
    """q, k, v as views into a fused qkv output (as in Attention), scattered into a larger cache."""
    g = torch.Generator().manual_seed(T + nh + hd + rot)
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g).to(dev, dtype).view(T, nh + 2 * nkv, hd)
    q, k, v = qkv.split([nh, nkv, nkv], dim=1)  # strided views, last dim contiguous
    pos = torch.randint(0, 500, (T,), generator=g).float()
    freqs = pos[:, None] / 10000 ** (torch.arange(0, rot, 2).float() / rot)  # [T, rot/2]
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(dev, dtype)
    sin = torch.cat([-freqs.sin(), freqs.sin()], -1).to(dev, dtype)
    S = 4 * T + 3
    slots = torch.randperm(S, generator=g)[:T].to(dev)
    kc = torch.randn(S, nkv, hd, generator=g).to(dev, dtype)
    vc = torch.randn(S, nkv, hd, generator=g).to(dev, dtype)
    kc0, vc0, v0 = kc.clone(), vc.clone(), v.clone()
    want_q = apply_rotary(q.float(), cos.float(), sin.float())
    want_k = apply_rotary(k.float(), cos.float(), sin.float())

    triton_fused.rope_and_cache(q, k, v, cos, sin, slots, kc, vc)
    close(q, want_q, dtype)  # rotated in place, through the views
    close(k, want_k, dtype)
    assert torch.equal(v, v0)
    assert torch.equal(kc[slots], k) and torch.equal(vc[slots], v)
    others = torch.ones(S, dtype=torch.bool, device=dev)
    others[slots] = False
    assert torch.equal(kc[others], kc0[others]) and torch.equal(vc[others], vc0[others])


def check_silu_mul(dtype: torch.dtype, dev: str, T: int, I: int) -> None:  # noqa: E741
    g = torch.Generator().manual_seed(I)
    x = torch.randn(T, 2 * I + 8, generator=g).to(dev, dtype)[:, : 2 * I]  # rows strided
    gate, up = x.float().split(I, dim=-1)
    close(triton_fused.silu_mul(x), F.silu(gate) * up, dtype)


DTYPES = [torch.float32, torch.float16]
ROPE_SHAPES = [  # (nh, nkv, hd, rot_dim)
    (4, 4, 64, 64),  # MHA
    (8, 2, 64, 64),  # GQA
    (8, 2, 64, 32),  # partial rotary
    (4, 2, 80, 40),  # head dim and rotary half not powers of two
]


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 64), (5, 80)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, T, H, residual):
    check_rms_norm(dtype, DEV, T, H, residual)


@kernels
def test_rms_norm_of_head_views():
    """[T, heads, hd] strided views (Qwen3's q/k norm over the fused qkv output)."""
    qkv = torch.randn(3, 7, 32, device=DEV)
    w = torch.rand(32, device=DEV)
    want = F.rms_norm(qkv[:, 2:6], (32,), w, 1e-6)
    close(triton_fused.rms_norm(qkv[:, 2:6], w, 1e-6), want, torch.float32)


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("nh,nkv,hd,rot", ROPE_SHAPES)
def test_rope_and_cache(dtype, T, nh, nkv, hd, rot):
    check_rope_and_cache(dtype, DEV, T, nh, nkv, hd, rot)


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 128), (3, 1500)])
def test_silu_mul(dtype, T, I):  # noqa: E741
    check_silu_mul(dtype, DEV, T, I)


def test_cpu_tensors_keep_the_torch_path():
    x = torch.randn(2, 8)
    assert not triton_fused.usable(x)  # the dispatch needs CUDA tensors, interpreter or not
    from spillover.layers.norm import RMSNorm

    norm, r = RMSNorm(8), torch.randn(2, 8)
    out, h = norm(x, residual=r)
    assert torch.equal(h, x + r) and torch.equal(out, F.rms_norm(x + r, (8,), norm.weight, norm.eps))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd,rot", [(32, 8, 128, 128), (8, 2, 64, 32)])
def test_kernels_on_cuda(dtype, nh, nkv, hd, rot):
    check_rms_norm(dtype, "cuda", 3, 4096, False)
    check_rms_norm(dtype, "cuda", 3, 4096, True)
    check_rope_and_cache(dtype, "cuda", 5, nh, nkv, hd, rot)
    check_silu_mul(dtype, "cuda", 3, 14336)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "extra",
    [{}, {"model_type": "qwen3", "head_dim": 32}, {"partial_rotary_factor": 0.5}],
    ids=["llama", "qwen3", "partial-rotary"],
)
def test_fused_model_matches_torch_path(extra, monkeypatch):
    """bf16 on CUDA: the fused path (CUDA graphs on) gives the unfused torch path's logprobs, prompt and decode,
    up to bf16 rounding (the fused kernels round once, the torch ops after every op)."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048) | extra  # fmt: skip
    prompt = list(range(10, 90))
    fused = LLM(random_source(cfg), dtype="bf16", device_map="cuda", max_batch_size=4, progress=False)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=True)
    got = fused.generate(prompt, params)
    monkeypatch.setattr(triton_fused, "ENABLED", False)
    ref = LLM(random_source(cfg), dtype="bf16", device_map="cuda", cuda_graphs=False, progress=False)
    want = ref.generate(
        prompt + got.token_ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    )
    got_lp = got.prompt_logprobs[1:] + [t.logprob for t in got.logprobs]
    diff = max(abs(a - b) for a, b in zip(got_lp, want.prompt_logprobs[1:], strict=True))
    assert diff < 5e-2, diff

"""The bf16 C GEMV for CPU-computed linears and CPU experts (layers/cpu_gemv.c) against float64 products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spillover.layers import cpu_linear as C

pytestmark = pytest.mark.skipif(C.library() is None, reason="no C compiler")


def _ref(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


@pytest.mark.parametrize(
    ("N", "K", "M"), [(64, 64, 1), (130, 4104, 3), (7, 40, 2), (515, 256, 8), (1, 15, 1)]
)
def test_gemv_equals_the_f64_product_of_the_bf16_weights(N, K, M):
    """Any width (tails not a multiple of 16, rows not a multiple of 4), 1-8 rows: f32 accumulation of the exact
    f32 value of each bf16 weight."""
    g = torch.Generator().manual_seed(N * K + M)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    x = torch.randn(M, K, generator=g)
    y = C.gemv_bf16(w, x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), _ref(w, x), atol=1e-4 * K**0.5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_stacked_experts_by_id(shared):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 48, 80, generator=g).to(torch.bfloat16)  # [E, N, K]
    ids = [4, 0, 4, 2]
    x = torch.randn(1, 80, generator=g) if shared else torch.randn(4, 1, 80, generator=g)
    y = C.gemv_bf16(w, x, ids, shared=shared)
    want = torch.stack([_ref(w[e], x if shared else x[j]) for j, e in enumerate(ids)])
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)


def test_cpu_linear_is_torch_linear_for_decode_rows_and_falls_back_otherwise(monkeypatch):
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=g))
    model = nn.Sequential(lin, nn.Linear(40, 8).float())
    assert C.use_cpu_gemv_(model) == 1  # only the bf16 CPU linear
    assert type(model[0]) is C.CPULinear and type(model[1]) is nn.Linear
    calls = []
    real = C.gemv_bf16
    monkeypatch.setattr(C, "gemv_bf16", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for rows in (1, 8, 9):  # 9 rows: a prompt, torch's GEMM
            x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
            got = model[0](x)
            want = (x.double() @ lin.weight.double().T + lin.bias.double()).to(torch.bfloat16)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    assert len(calls) == 2


def test_a_bf16_model_on_the_cpu_decodes_through_the_c_gemv_as_through_torch(tiny_models, monkeypatch):
    """The loader turns the CPU-resident bf16 linears into CPULinear; greedy decode and its logprobs are
    torch's bf16 linear's (the kernel's numbers are checked against float64 above)."""
    from spillover import LLM, SamplingParams

    llm = LLM(str(tiny_models["llama"]), dtype="bf16", progress=False)
    kinds = {type(m) for layer in llm.model.layers for m in layer.modules() if isinstance(m, nn.Linear)}
    assert kinds == {C.CPULinear}
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    prompt = [1, 5, 9, 200, 31, 7]
    fast = llm.generate(prompt, sp)
    monkeypatch.setattr(C, "usable", lambda w, rows: False)
    slow = llm.generate(prompt, sp)
    assert fast.token_ids == slow.token_ids
    a = [lp.logprob for lp in fast.logprobs]
    b = [lp.logprob for lp in slow.logprobs]
    assert len(a) == 8
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("nh", "nkv", "hd", "L"), [(8, 2, 64, 700), (32, 8, 128, 1300), (4, 4, 96, 5)])
def test_decode_attention_reads_the_paged_cache_in_place(dtype, nh, nkv, hd, L):
    """The C decode attention (scattered slots, per-sequence lengths, grouped KV heads, spans merged) equals
    softmax(q K^T) V computed in f64 on the same cache."""
    if C.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(L)
    B, S = 3, 3 * L + 50
    kc, vc = (torch.randn(S, nkv, hd, dtype=dtype) for _ in range(2))
    slots = torch.stack([torch.randperm(S)[:L] for _ in range(B)])
    lens = torch.tensor([L, max(1, L // 3), 1], dtype=torch.int32)
    q = torch.randn(B, nh, hd, dtype=dtype)
    out = C.decode_attention(q, kc, vc, slots, lens, hd**-0.5)
    assert out.dtype == dtype and out.shape == (B, nh, hd)
    for b in range(B):
        k, v = (c[slots[b, : lens[b]]].double().transpose(0, 1) for c in (kc, vc))  # [nkv, n, hd]
        qg = q[b].double().view(nkv, nh // nkv, hd)
        ref = (torch.softmax(qg @ k.transpose(-1, -2) * hd**-0.5, -1) @ v).reshape(nh, hd)
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding
        assert (out[b].double() - ref).abs().max() < tol


def test_decode_attention_declines_what_it_does_not_read():
    q, kc = torch.randn(1, 4, 64), torch.randn(10, 2, 64).half()
    slots = torch.arange(10)[None]
    assert C.decode_attention(q, kc, kc, slots, None, 0.125) is None  # f16 cache: torch's path


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="x86-64 builds")
def test_decode_attention_without_avx512_equals_the_vector_path():
    """cpu_gemv.c built for plain x86-64 (its scalar loops) gives what the AVX-512 build gives."""
    import ctypes

    from spillover import native

    if C.library() is None:
        pytest.skip("no C compiler")
    flags = tuple("-march=x86-64" if f == "-march=native" else f for f in native.FLAGS)
    plain = native.build(C.SOURCE, flags)
    assert plain is not None
    torch.manual_seed(0)
    B, nh, nkv, hd, L = 2, 8, 2, 64, 300
    kc, vc = (torch.randn(B * L, nkv, hd, dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(B * L).view(B, L)
    lens = torch.tensor([L, 77], dtype=torch.int32)
    q = torch.randn(B, nh, hd)
    out = torch.empty(B, nh, hd)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    plain.cpu_decode_attn.argtypes = [
        p,
        p,
        p,
        ctypes.c_int,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        ctypes.c_float,
        p,
        ctypes.c_int,
    ]
    args = (kc.data_ptr(), vc.data_ptr(), 2, slots.data_ptr(), lens.data_ptr(), B, nh, nkv, hd, L, hd**-0.5)
    assert plain.cpu_decode_attn(q.data_ptr(), *args, out.data_ptr(), 1) == 1
    ref = C.decode_attention(q, kc, vc, slots, lens, hd**-0.5)
    assert (out - ref).abs().max() < 1e-5

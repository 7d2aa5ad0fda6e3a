"""The paged decode kernel (layers/triton_attention.py) against SDPA over the gathered context, including
long contexts cut into chunks whose results a second kernel combines. Without a GPU the kernels run in
Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1): f32 and f16 only."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from spillover.layers import triton_attention as ta  # noqa: E402

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and type(ta._decode_kernel).__name__ != "InterpretedFunction",
    reason="no CUDA and the kernels were not defined under TRITON_INTERPRET=1",
)


def reference(q, kc, vc, slots, lens, scale):
    out = []
    for b, n in enumerate(lens.tolist()):
        k = kc[slots[b, :n]].transpose(0, 1).float()  # [nkv, n, hd]
        v = vc[slots[b, :n]].transpose(0, 1).float()
        o = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens", [[1], [5, 300], [700, 1, 64], [1500, 513]])
def test_paged_decode_matches_sdpa(dtype, lens):
    if DEV == "cuda" and dtype == torch.float32:
        pytest.skip(
            "on CUDA tl.dot takes f32 as TF32; the kernel serves bf16/f16 (tests/test_gpu.py has bf16)"
        )
    g = torch.Generator().manual_seed(sum(lens))
    B, nh, nkv, hd, S = len(lens), 8, 2, 64, 4096
    q = torch.randn(B, nh, hd, generator=g).to(DEV, dtype)
    kc = torch.randn(S, nkv, hd, generator=g).to(DEV, dtype)
    vc = torch.randn(S, nkv, hd, generator=g).to(DEV, dtype)
    L = max(lens)
    slots = torch.stack([torch.randperm(S, generator=g)[:L] for _ in lens]).to(DEV)  # scattered slots
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    got = ta.paged_decode(q, kc, vc, slots, lens_t, hd**-0.5)
    want = reference(q, kc, vc, slots, lens_t, hd**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (got.float() - want).abs().max().item() < tol
    assert (ta.num_splits(B, nkv, L) > 1) == (L >= ta.MIN_SPLIT_LEN)  # both paths are covered


def test_num_splits_fills_the_gpu_only_for_long_contexts():
    assert ta.num_splits(1, 8, 256) == 1  # short: one pass
    assert ta.num_splits(1, 8, 4096) == 32  # 8 programs -> 256
    assert ta.num_splits(64, 8, 4096) == 1  # a big batch fills the GPU already
    assert ta.num_splits(1, 8, 512) == 4  # never less than two blocks of 64 tokens per chunk
    assert ta.num_splits(1, 1, 1 << 20) == 64  # capped

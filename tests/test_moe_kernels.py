"""Expert kernels: quantized experts indexed by expert id in one Triton launch (quant/kernels.py, run in the
CPU interpreter without a GPU: conftest.py sets TRITON_INTERPRET=1), and the CPU decode path (few pairs)."""

from __future__ import annotations

import os

import pytest
import torch

from spillover.layers import cpu_linear, moe
from spillover.layers.moe import Experts, route_topk
from spillover.quant import kernels as K


def _experts(E: int, H: int, I: int, dtype: torch.dtype = torch.float32) -> Experts:  # noqa: E741
    ex = Experts(E, H, I)
    g = torch.Generator().manual_seed(E * 100 + H)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        ex.down_proj.copy_(torch.randn(E, H, I, generator=g) / I**0.5)
    return ex.to(dtype)


DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(
    not K.HAVE_TRITON or (DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="no CUDA and the Triton interpreter not enabled",
)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_experts_in_one_launch_equal_the_dequantized_experts(bits):
    """The gathered path of quantized experts (each pair's expert read through its id, no host sync) gives
    the per-expert dequantized weights' result. H=40, I=24: not the int4 CPU kernel's shapes, so the plain
    layout the GPU kernels take is kept on the CPU here."""
    ex = _experts(E=6, H=40, I=24)
    for attr in ("gate_up_proj", "down_proj"):
        ex.quantize_(attr, bits, None, DEV)
    assert ex._kernel_format() == ("w4" if bits == 4 else "w8")
    assert ex.down_proj_qweight.shape[0] == 6 and not hasattr(ex, "down_proj")
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(DEV)
    idx, w = route_topk(torch.randn(3, 6, generator=torch.Generator().manual_seed(2)), 2, True)
    idx = idx.to(DEV)
    assert ex.gathers(6, torch.device(DEV)) == (DEV == "cuda")
    with torch.no_grad():
        got = ex._gathered(x, idx)  # [T*k, H]
        want = []  # per (token, slot) pair: its expert's dequantized weights, in f32
        for p, e in enumerate(idx.reshape(-1).tolist()):
            gate, up = (ex.q["gate_up_proj"][e].dequantize(torch.float32) @ x[p // 2]).split(24)
            want.append(
                ex.q["down_proj"][e].dequantize(torch.float32) @ (torch.nn.functional.silu(gate) * up)
            )
        want = torch.stack(want)
    assert got.shape == (6, 40)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gemv", ["c", "torch", "onednn"])
@pytest.mark.parametrize("T", [1, 3])
def test_cpu_decode_path_bf16_either_gemv(monkeypatch, gemv, T):
    """bf16 experts on the CPU, a decode-sized step: the C GEMV (layers/cpu_gemv.c, one row), torch's own
    GEMV or oneDNN's, the same result as the definition in f32 (within bf16 rounding)."""
    if gemv == "c" and cpu_linear.library() is None:
        pytest.skip("no C compiler")
    ex = _experts(E=8, H=64, I=32, dtype=torch.bfloat16)
    monkeypatch.setitem(moe._NATIVE_GEMV, (64, 64, torch.bfloat16), gemv == "torch")
    if gemv != "c":
        monkeypatch.setattr(cpu_linear, "usable", lambda w, rows: False)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    idx, w = route_topk(torch.randn(T, 8, generator=torch.Generator().manual_seed(4)), 3, True)
    with torch.no_grad():
        got = ex(x, idx, w).float()
        want = torch.zeros(T, 64)
        for t in range(T):
            for j in range(3):
                e = int(idx[t, j])
                gate, up = (ex.gate_up_proj[e].float() @ x[t].float()).split(32)
                want[t] += w[t, j] * (ex.down_proj[e].float() @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    assert torch.backends.mkldnn.enabled == torch.backends.mkldnn.is_available()  # restored


def test_cpu_native_gemv_is_decided_once_per_shape():
    ex = _experts(E=4, H=48, I=16, dtype=torch.bfloat16)
    key = (32, 48, torch.bfloat16)
    moe._NATIVE_GEMV.pop(key, None)
    first = moe.cpu_native_gemv(ex.gate_up_proj.data)
    assert moe._NATIVE_GEMV[key] is first and moe.cpu_native_gemv(ex.gate_up_proj.data) is first
    assert moe.cpu_native_gemv(ex.gate_up_proj.data.float()) is False  # f32: oneDNN is not the slow path

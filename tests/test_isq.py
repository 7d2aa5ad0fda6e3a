"""In-situ quantization: close to the unquantized model, and exactly the bytes the planner counted."""

from __future__ import annotations

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.quant.isq import Int4Linear, Int8Linear


@pytest.mark.parametrize("bits, tol", [(8, 0.05), (4, 0.5)])
def test_isq_logprobs_close_to_full_precision(tiny_models, bits, tol):
    path = str(tiny_models["llama"])
    prompt = list(range(20, 60))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    full = LLM(path, dtype="f32", progress=False).generate(prompt, params).prompt_logprobs[1:]
    q = LLM(path, dtype="f32", isq=bits, progress=False)
    got = q.generate(prompt, params).prompt_logprobs[1:]
    err = sum(abs(a - b) for a, b in zip(got, full, strict=True)) / len(full)
    assert err < tol
    cls = Int8Linear if bits == 8 else Int4Linear
    assert isinstance(q.model.layers[0].mlp.gate_up_proj, cls)
    assert isinstance(q.model.lm_head, torch.nn.Linear)  # lm_head and embeddings keep the model dtype


@pytest.mark.parametrize("bits", [8, 4])
def test_isq_bytes_match_the_plan(tiny_models, bits):
    llm = LLM(str(tiny_models["qwen2"]), dtype="f32", isq=bits, progress=False)
    layer_bytes = sum(p.numel() * p.element_size() for p in llm.model.layers.parameters())
    planned = sum(r.weight_bytes for r in llm.plan.rows)
    other = sum(
        p.numel() * p.element_size() for n, p in llm.model.named_parameters() if not n.startswith("layers.")
    )
    assert layer_bytes + other == planned


def test_int8_dequantize_error_is_small():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    q = Int8Linear(lin)
    rel = (q.dequantize(torch.float32) - lin.weight).abs().max() / lin.weight.abs().max()
    assert rel < 0.01
    x = torch.randn(3, 256)
    assert torch.allclose(q(x), x @ q.dequantize(torch.float32).T, atol=1e-3, rtol=1e-3)


def test_int4_roundtrip_within_half_step():
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 8, bias=True)  # 100 is not a multiple of the group size: padded groups
    q = Int4Linear(lin)
    w = q.dequantize(torch.float32)
    assert w.shape == lin.weight.shape
    step = q.scale.float().repeat_interleave(32, dim=1)[:, :100]
    assert ((w - lin.weight).abs() <= step * 0.5 + 1e-2).all()

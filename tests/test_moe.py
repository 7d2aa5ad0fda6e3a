"""Mixture-of-experts: the experts' grouped and gathered computations, ISQ on experts, expert stages."""

from __future__ import annotations

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.layers.moe import Experts, route_topk


def _experts(E: int = 6, H: int = 16, I: int = 8) -> Experts:  # noqa: E741
    ex = Experts(E, H, I)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g))
        ex.down_proj.copy_(torch.randn(E, H, I, generator=g))
    return ex


def _reference(ex: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: the definition."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate, up = (ex.gate_up_proj[e] @ x[t]).split(ex.inter)
            out[t] += w[t, j] * (ex.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_and_gathered_paths_equal_the_definition():
    ex = _experts()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    idx, w = route_topk(torch.randn(5, 6, generator=torch.Generator().manual_seed(2)), 2, True)
    want = _reference(ex, x, idx, w)
    with torch.no_grad():
        grouped = ex(x, idx, w)  # CPU: grouped by expert
        gathered = (ex._gathered(x, idx).view(5, 2, -1) * w.unsqueeze(-1)).sum(1)
    assert torch.allclose(grouped, want, atol=1e-5)
    assert torch.allclose(gathered, want, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_grouped_path_runs_only_the_hit_experts(monkeypatch):
    ex = _experts(E=32)
    ran: list[int] = []
    orig = ex._expert
    monkeypatch.setattr(ex, "_expert", lambda e, x, to=None: (ran.append(e), orig(e, x, to))[1])
    idx = torch.tensor([[3, 7], [7, 3], [30, 3]])
    with torch.no_grad():
        ex(torch.randn(3, 16), idx, torch.full((3, 2), 0.5))
    assert ran == [3, 7, 30]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("bits, tol", [(8, 0.05), (4, 0.5)])
def test_isq_on_experts_close_to_full_precision(tiny_models, arch, bits, tol):
    from spillover.quant.isq import Int4Linear, Int8Linear

    path = str(tiny_models[arch])
    prompt = list(range(20, 60))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    full = LLM(path, dtype="f32", progress=False).generate(prompt, params).prompt_logprobs[1:]
    q = LLM(path, dtype="f32", isq=bits, progress=False)
    got = q.generate(prompt, params).prompt_logprobs[1:]
    assert sum(abs(a - b) for a, b in zip(got, full, strict=True)) / len(full) < tol
    experts = q.model.layers[0].mlp.experts
    cls = Int8Linear if bits == 8 else Int4Linear
    assert experts.quantized and all(isinstance(m, cls) for m in (*experts.q_gate_up, *experts.q_down))
    assert len(experts.q_gate_up) == experts.num_experts
    # exactly the bytes the plan counted (experts quantized, routers and norms in the model dtype)
    held = sum(p.numel() * p.element_size() for p in q.model.parameters())
    assert held == sum(r.weight_bytes for r in q.plan.rows)


def test_expert_stream_threshold_from_the_cost_model():
    from spillover.placement.cost_model import Bandwidths, expert_stream_pairs

    qwen30b = expert_stream_pairs(3 * 768 * 2048, 128, Bandwidths())
    assert (
        8 * 64 < qwen30b < 8 * 2048
    )  # decode and short prompts compute on the CPU; a 2048-token prefill streams
    faster_cpu = expert_stream_pairs(3 * 768 * 2048, 128, Bandwidths(cpu_tflops=4.0))
    assert faster_cpu == pytest.approx(4 * qwen30b, rel=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_experts_on_cpu_equal_all_on_gpu(tiny_models, arch):
    """Experts of the first 2 layers in CPU memory (computed there; for a long enough step copied to the GPU),
    attention, router and KV on the GPU: the same tokens and logprobs as everything on the GPU."""
    path = str(tiny_models[arch])
    prompt = list(range(10, 60))
    params = SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=True, ignore_eos=True)
    base = LLM(path, dtype="f32", device_map="cuda", progress=False).generate(prompt, params)
    llm = LLM(path, dtype="f32", device_map="cuda", n_cpu_moe=2, progress=False)
    assert llm.device_map.experts[:3] == ("cpu", "cpu", "cuda:0")
    ex = llm.model.layers[0].mlp.experts
    assert ex.device.type == "cpu" and llm.model.layers[0].input_layernorm.weight.is_cuda
    assert ex.stream_pairs is not None
    for stream_pairs in (None, 8):  # CPU compute for every step; then prompts copy the experts to the GPU
        for layer in llm.model.layers[:2]:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.stream_pairs = stream_pairs
        got = llm.generate(prompt, params)
        assert got.token_ids == base.token_ids
        diff = max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], base.prompt_logprobs[1:], strict=True))
        assert diff < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_isq4_experts_on_cpu_close_to_all_on_gpu(tiny_models):
    path = str(tiny_models["qwen3_moe"])
    prompt = list(range(10, 60))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    base = LLM(path, dtype="bf16", device_map="cuda", isq=4, progress=False).generate(prompt, params)
    llm = LLM(path, dtype="bf16", device_map="cuda", isq=4, n_cpu_moe=3, progress=False)
    assert llm.model.layers[0].mlp.experts.q_gate_up[0].cpu_kernel  # torch's int4 CPU kernel
    got = llm.generate(prompt, params)
    err = sum(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], base.prompt_logprobs[1:], strict=True))
    assert err / (len(prompt) - 1) < 0.05

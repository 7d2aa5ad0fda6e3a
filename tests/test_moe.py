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
    monkeypatch.setattr(ex, "_expert", lambda e, x, to=None, **kw: (ran.append(e), orig(e, x, to, **kw))[1])
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
    assert experts.quantized and all(isinstance(m, cls) for proj in experts.q.values() for m in proj)
    assert len(experts.q["gate_up_proj"]) == experts.num_experts
    assert experts.q["down_proj"][1].qweight.data_ptr() == experts.down_proj_qweight[1].data_ptr()  # views
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
    pinned = expert_stream_pairs(3 * 768 * 2048, 128, Bandwidths(), pinned=True)
    assert pinned == pytest.approx(
        qwen30b / 2, rel=0.01
    )  # copies twice as fast: streaming from half the pairs


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
    assert llm.model.layers[0].mlp.experts.q["gate_up_proj"][0].cpu_kernel  # torch's int4 CPU kernel
    got = llm.generate(prompt, params)
    err = sum(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], base.prompt_logprobs[1:], strict=True))
    assert err / (len(prompt) - 1) < 0.05


def _transformers_model(cfg, seed: int):  # noqa: ANN202
    """A random transformers MoE model: norms near 1, router logits spread (std 1) so routing is decisive."""
    import transformers

    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    return ref


def _write_qwen3_moe_gguf(path, model, cfg) -> None:
    """A GGUF as llama.cpp's converter writes Qwen3-MoE (arch qwen3moe, stacked ffn_*_exps), f32 tensors, with
    a placeholder tokenizer (token-id prompts only)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    a = "qwen3moe"
    for key, kind, value in [
        ("block_count", "uint32", cfg.num_hidden_layers), ("embedding_length", "uint32", cfg.hidden_size),
        ("feed_forward_length", "uint32", cfg.intermediate_size), ("context_length", "uint32", 256),
        ("attention.head_count", "uint32", cfg.num_attention_heads),
        ("attention.head_count_kv", "uint32", cfg.num_key_value_heads),
        ("attention.key_length", "uint32", cfg.head_dim), ("attention.value_length", "uint32", cfg.head_dim),
        ("rope.freq_base", "float32", 10000.0), ("attention.layer_norm_rms_epsilon", "float32", 1e-6),
        ("expert_count", "uint32", cfg.num_experts), ("expert_used_count", "uint32", cfg.num_experts_per_tok),
        ("expert_feed_forward_length", "uint32", cfg.moe_intermediate_size),
    ]:  # fmt: skip
        getattr(w, f"add_{kind}")(f"{a}.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    inter = cfg.moe_intermediate_size
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp"}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for hf, g in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[f"model.layers.{i}.{hf}.weight"])
        gate_up = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"]  # transformers 5: [E, 2I, H]
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter].copy())
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:].copy())
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", sd[f"model.layers.{i}.mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_moe_gguf_matches_transformers(tmp_path):
    """llama.cpp's names (ffn_gate_inp, stacked ffn_*_exps [E, out, in]) load into the same model: prompt
    logprobs of the GGUF within 1e-4 of transformers on the same weights; ISQ applies to its experts."""
    import transformers
    from conftest import TINY

    cfg = transformers.Qwen3MoeConfig(**{**TINY, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 3,
                                         "moe_intermediate_size": 32, "norm_topk_prob": True})  # fmt: skip
    ref = _transformers_model(cfg, seed=3)
    path = tmp_path / "tiny-qwen3moe.gguf"
    _write_qwen3_moe_gguf(path, ref, cfg)
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    want = [lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    llm = LLM(str(path), dtype="f32", progress=False)
    assert llm.config.extra["stacked_experts"] and llm.config.extra["num_experts"] == 8
    got = llm.generate(prompt, params).prompt_logprobs[1:]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    q = LLM(str(path), dtype="f32", isq=8, progress=False)
    assert q.model.layers[0].mlp.experts.quantized
    held = sum(p.numel() * p.element_size() for p in q.model.parameters())
    assert held == sum(r.weight_bytes for r in q.plan.rows)
    got8 = q.generate(prompt, params).prompt_logprobs[1:]
    assert sum(abs(a - b) for a, b in zip(got8, want, strict=True)) / len(want) < 0.05


def test_mixtral_gguf_as_llama_cpp_writes_it(tmp_path):
    """llama.cpp writes Mixtral as general.architecture "llama" with llama.expert_count, q/k rows permuted for
    its rope, experts stacked: it loads as Mixtral, prompt logprobs within 1e-4 of transformers."""
    import transformers
    from conftest import TINY, tiny_llama_gguf_writer

    cfg = transformers.MixtralConfig(**{**TINY, "num_local_experts": 4, "num_experts_per_tok": 2})
    ref = _transformers_model(cfg, seed=4)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

    def permute(w, heads):  # llama.cpp's convert_hf_to_gguf permutation (models/llama.unpermute_qk undoes it)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    path = tmp_path / "tiny-mixtral.gguf"
    w = tiny_llama_gguf_writer(path, 3, expert_count=4, expert_used_count=2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(3):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], 2))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # [E, 2I, H]
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :128].copy())
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", gate_up[:, 128:].copy())
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    want = [lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    llm = LLM(str(path), dtype="f32", progress=False)
    assert llm.config.model_type == "mixtral" and llm.config.extra["num_experts"] == 4
    got = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))
    assert max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], want, strict=True)) < 1e-4

"""benchmarks/llamacpp.py's GGUF writer (issue 20): the file spillover loads is the model it was written from.
(That llama.cpp loads it is checked where llama.cpp runs: benchmarks/llamacpp_gpu.sh.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
llamacpp = pytest.importorskip("llamacpp")

from spillover import LLM, SamplingParams  # noqa: E402
from spillover.loading.source import open_source  # noqa: E402
from spillover.loading.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def bf16_pair(tiny_models, tmp_path_factory):
    """The tiny Llama with weights rounded to bf16, as a HF directory and as a GGUF from the writer."""
    import transformers

    root = tmp_path_factory.mktemp("llamacpp")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    host = {n: p.detach().to(torch.bfloat16) for n, p in model.state_dict().items()}
    with torch.no_grad():
        for n, p in model.state_dict().items():
            p.copy_(host[n].float())
    model.save_pretrained(root / "hf")
    cfg = json.loads((root / "hf" / "config.json").read_text())
    path = llamacpp.write_gguf(root / "tiny-bf16.gguf", cfg, llamacpp.torch_weights(host), name="tiny")
    return root / "hf", path, host, cfg


def test_gguf_tensors_round_trip(bf16_pair):
    _, path, host, cfg = bf16_pair
    src = open_source(str(path))
    assert src.kind == "gguf"
    assert set(src.tensors) == set(host)
    for name, t in host.items():
        got = src.load(name, "cpu", torch.bfloat16)
        assert torch.equal(got, t), name  # q/k: permuted on write, un-permuted by spillover's reader
    c = src.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size) == (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["vocab_size"])  # fmt: skip
    assert c.rope_theta == llamacpp.rope_theta(cfg)


def test_gguf_vocabulary_loads():
    tokens, types, merges = llamacpp.bpe_vocab(128256)
    assert len(tokens) == len(set(tokens)) == len(types) == 128256
    assert tokens[128000] == "<|begin_of_text|>" and types[128000] == 3 and types[127999] == 1
    assert all(a + b in set(tokens) for a, b in (m.split(" ") for m in merges))


def test_gguf_generates_like_the_hf_checkpoint(bf16_pair):
    hf, path, _, _ = bf16_pair
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids) == "hello world"
    params = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=True)
    prompt = [5, 17, 42, 7, 99, 3, 11]
    a = LLM(str(hf), device_map="cpu", dtype="f32", progress=False).generate(prompt, params)
    b = LLM(str(path), device_map="cpu", dtype="f32", progress=False).generate(prompt, params)
    assert a.token_ids == b.token_ids
    lp_a = torch.tensor([x for x in a.prompt_logprobs if x is not None])
    lp_b = torch.tensor([x for x in b.prompt_logprobs if x is not None])
    assert torch.allclose(lp_a, lp_b, atol=1e-4)


def test_use_more_bits_matches_llama_cpp_q4_k_m_rule():
    more = [i for i in range(32) if llamacpp.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_repeat_layers_copies_quantized_tensors(smollm2, tmp_path):
    """The Q4_K_M file's assembly step, on the real Q4_1 SmolLM2: 4 layers taken from source layers 0 and 1."""
    src = open_source(smollm2)
    c = src.config
    cfg = {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads, "num_hidden_layers": 4,
           "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size,
           "max_position_embeddings": 2048, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
           "vocab_size": c.vocab_size, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
    out = llamacpp.repeat_layers(smollm2, tmp_path / "four.gguf", cfg, lambda n, g: n % 2, "four", 3)
    got = open_source(str(out))
    assert got.config.num_hidden_layers == 4
    for n in range(4):
        for hf in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            a = got.load(f"model.layers.{n}.{hf}", "cpu", torch.float32)
            b = src.load(f"model.layers.{n % 2}.{hf}", "cpu", torch.float32)
            assert torch.equal(a, b), (n, hf)
    assert torch.equal(
        got.load("model.embed_tokens.weight", "cpu"), src.load("model.embed_tokens.weight", "cpu")
    )

"""Gemma 3 on the model contract: tiny random configs whose sliding windows are shorter than the prompts,
against transformers (fp32, CPU), through chunked prefill, batching, offload and split maps; the plan's KV
per layer; and the real Gemma 3 270M Q4_K_M GGUF against transformers loading the same file."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from spillover import LLM, DeviceMap, SamplingParams
from spillover.config import AutoDeviceMapParams
from spillover.engine.offload import OffloadExecutor
from spillover.models import model_class
from spillover.placement.estimate import requirements

PROMPT = torch.randint(3, 320, (45,), generator=torch.Generator().manual_seed(3)).tolist()
LOGPROBS = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=True, ignore_eos=True)


def _max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for x, y in zip(a[1:], b[1:], strict=True))


@pytest.fixture(scope="module")
def tiny(tiny_models) -> str:
    return str(tiny_models["gemma3"])


@pytest.fixture(scope="module")
def one_pass(tiny):
    return LLM(tiny, dtype="f32", progress=False).generate(PROMPT, LOGPROBS)


def test_layers_follow_the_config(tiny):
    llm = LLM(tiny, dtype="f32", progress=False)
    specs = model_class(llm.config.model_type).layer_specs(llm.config)
    assert [s.kv.sliding_window for s in specs] == [8, 8, None]
    assert [s.rope for s in specs] == ["local", "local", "global"]
    caches = llm.engine.runner.caches
    # a sliding layer's cache is its rings (16 slots each: the window of 8 rounded up to a block), the global
    # layer's the block pool
    assert caches.k[0].shape[0] == (caches.rings + 1) * 16 < caches.k[2].shape[0]


def test_chunked_prefill_across_the_window_edge(tiny, one_pass):
    for chunk in (3, 8, 13):  # chunks shorter than, equal to and longer than the window of 8
        llm = LLM(tiny, dtype="f32", progress=False)
        llm.engine.scheduler.max_batched_tokens = chunk
        out = llm.generate(PROMPT, LOGPROBS)
        assert out.token_ids == one_pass.token_ids
        assert _max_diff(out.prompt_logprobs, one_pass.prompt_logprobs) < 1e-5


def test_batch_of_mixed_lengths_equals_single_runs(tiny):
    llm = LLM(tiny, dtype="f32", progress=False, max_batch_size=3)
    prompts = [PROMPT[:5], PROMPT[:30], PROMPT[5:22]]  # shorter and longer than the window
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params).token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone


def test_split_map_matches_single_device(tiny, one_pass):
    dmap = DeviceMap(layers=("cpu", "cpu", "cpu"), embed="cpu", head="cpu")
    out = LLM(tiny, dtype="f32", device_map=dmap, progress=False).generate(PROMPT, LOGPROBS)
    assert out.token_ids == one_pass.token_ids and out.prompt_logprobs == one_pass.prompt_logprobs


@pytest.mark.parametrize(("streamed", "promote_at"), [((0, 1, 2), None), ((0, 2), 3)])
def test_offload_matches_plain_run(tiny, one_pass, streamed, promote_at):
    # the CPU stands in for the GPU; with promote_at, the CPU-computed sliding layer 1 is streamed for
    # prefills with its ring gathered into a window, and computed on the CPU for decodes
    llm = LLM(tiny, device_map="cpu", dtype="f32", progress=False)
    dmap = dataclasses.replace(DeviceMap.single("cpu", 3), streamed=streamed)
    ex = OffloadExecutor(llm.model, dmap, gpu="cpu", gpu_prefill_tokens=promote_at)
    llm.engine.runner.offload = ex
    out = llm.generate(PROMPT, LOGPROBS)
    assert out.token_ids == one_pass.token_ids
    assert _max_diff(out.prompt_logprobs, one_pass.prompt_logprobs) < 1e-4
    assert ex.streamer.copies > 0 and (promote_at is None or ex.steps["promoted"] >= 1)


def test_plan_reserves_the_window_for_sliding_layers():
    cfg = model_class("gemma3_text").config_from_hf(GEMMA3_270M)
    req = requirements(cfg, AutoDeviceMapParams(max_seq_len=32768), "bf16")
    per_token = 2 * 1 * 256 * 2  # K and V, one kv head of 256, bf16
    full = [i for i, t in enumerate(cfg.extra["layer_types"]) if t == "full_attention"]
    assert full == [5, 11, 17]
    assert [req.layer_kv[i] for i in full] == [32768 * per_token] * 3  # 32 MiB
    assert all(req.layer_kv[i] == 512 * per_token for i in range(18) if i not in full)  # 512 KiB: the window
    assert sum(req.layer_kv) == 3 * 32768 * per_token + 15 * 512 * per_token  # 103.5 MiB, not 576 MiB


GEMMA3_270M = {  # google/gemma-3-270m's config.json (text part)
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "sliding_window": 512, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
}  # fmt: skip


# ---------------------------------------------------------------- the real Gemma 3 270M (Q4_K_M GGUF)


@pytest.fixture(scope="module")
def gemma(gemma3):
    return LLM(gemma3, dtype="f32", progress=False, max_seq_len=1024)


@pytest.fixture(scope="module")
def gemma_ref(gemma3):
    import transformers

    d, f = os.path.dirname(gemma3), os.path.basename(gemma3)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def test_real_gemma3_matches_transformers(gemma, gemma_ref):
    ids = gemma.encode("The capital of France is Paris. The capital of Germany is")
    with torch.no_grad():
        lp = torch.log_softmax(gemma_ref(torch.tensor([ids])).logits[0].float(), -1)
    want = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    out = gemma.generate(
        ids, SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=True, ignore_eos=True)
    )
    assert max(abs(a - b) for a, b in zip(out.prompt_logprobs[1:], want, strict=True)) < 1e-3
    ref = gemma_ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert out.token_ids == ref[0, len(ids) :].tolist()
    assert "Berlin" in out.text


def test_real_gemma3_chat_template(gemma):
    # the file ships no template: Gemma 3's own comes from models/gemma3.py. (This is the base model, not the
    # instruction-tuned one: it continues text well but does not answer chats.)
    prompt = gemma.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    chat = gemma.chat([{"role": "user", "content": "Hi"}], params)
    assert chat.token_ids == gemma.generate(gemma.encode(prompt.removeprefix("<bos>")), params).token_ids
    assert 106 in gemma.engine.eos_ids  # <end_of_turn> ends a turn


def test_real_gemma3_fused_cpu_decode_matches_f32(gemma3, gemma):
    """The default mode keeps the GGUF blocks and decodes each layer in one C call (gguf_native.CPUDecodeLayer:
    q/k norms, four norms, GELU-tanh, Q5_0 q/k + Q8_0 v parts), its prompt rows in two around the attention
    (the int16 GEMM of Q5_0, Q8_0, Q4_K and Q6_K rows): the f32 path's tokens and logprobs, prompt logprobs
    included, for a batch of different lengths."""
    from spillover.quant import gguf_kernels
    from spillover.quant.gguf_native import CPUDecodeLayer

    if gguf_kernels.library() is None:
        pytest.skip("no C compiler for quant/gguf_cpu.c")
    native = LLM(gemma3, progress=False, max_seq_len=1024)
    prompts = ["The capital of France is Paris. The capital of Germany is", "def add(a, b):"]
    p = SamplingParams(max_tokens=6, temperature=0, logprobs=1, prompt_logprobs=True, ignore_eos=True)
    for a, b in zip(native.generate(prompts, p), gemma.generate(prompts, p), strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3
        dev = [abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True)]
        assert 0 < max(dev) < 3e-3  # (int16 activations: not the f32 path)
    fused = [layer.__dict__.get("cpu_decode") for layer in native.model.layers]
    assert all(isinstance(f, CPUDecodeLayer) and f.prefill_ok == gguf_kernels.gemm_ok() for f in fused)

"""Parity with transformers on tiny random models of every supported architecture and rope type (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS

from spillover import LLM, DeviceMap, SamplingParams


def reference_prompt_logprobs(path, prompt: list[int]) -> list[float]:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    return [lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prompt_logprobs_match_transformers(tiny_models, arch):
    prompt = torch.randint(3, 320, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    want = reference_prompt_logprobs(tiny_models[arch], prompt)
    llm = LLM(str(tiny_models[arch]), dtype="f32", progress=False)
    got = llm.generate(
        prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    ).prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    assert max(abs(a - b) for a, b in zip(got[1:], want, strict=True)) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama-yarn-rope", "qwen3_moe", "mixtral"])
def test_greedy_matches_transformers_generate(tiny_models, arch):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    prompt = list(range(5, 17))
    want = ref.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    llm = LLM(str(tiny_models[arch]), dtype="f32", progress=False)
    got = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert got.token_ids == want[0, len(prompt) :].tolist()
    assert got.finish_reason == "length"


def test_chunked_prefill_equals_one_pass(tiny_models, monkeypatch):
    """A prompt prefilled in small chunks (attending to cached K/V) gives the same logprobs as one pass."""
    path = str(tiny_models["llama"])
    prompt = torch.randint(3, 320, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=True, ignore_eos=True)
    one = LLM(path, dtype="f32", progress=False).generate(prompt, params)
    llm = LLM(path, dtype="f32", progress=False)
    llm.engine.scheduler.max_batched_tokens = 16
    chunked = llm.generate(prompt, params)
    assert chunked.token_ids == one.token_ids
    assert (
        max(abs(a - b) for a, b in zip(chunked.prompt_logprobs[1:], one.prompt_logprobs[1:], strict=True))
        < 1e-5
    )


def test_batch_of_mixed_lengths_equals_single_runs(tiny_models):
    llm = LLM(str(tiny_models["qwen2"]), dtype="f32", progress=False)
    prompts = [list(range(5, 9)), list(range(30, 80)), list(range(100, 117))]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params).token_ids for p in prompts]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone


def test_split_map_through_hop_code_matches_single_device(tiny_models):
    """A DeviceMap that names devices per layer (all "cpu" here) runs through the per-layer device hops."""
    path = str(tiny_models["llama"])
    prompt = list(range(10, 40))
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=True, ignore_eos=True)
    base = LLM(path, dtype="f32", progress=False).generate(prompt, params)
    dmap = DeviceMap(layers=("cpu", "cpu", "cpu"), embed="cpu", head="cpu")
    split = LLM(path, dtype="f32", device_map=dmap, progress=False).generate(prompt, params)
    assert split.token_ids == base.token_ids
    assert split.prompt_logprobs == base.prompt_logprobs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cpu_split_matches_single_device(tiny_models):
    path = str(tiny_models["llama"])
    prompt = list(range(10, 40))
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=True, ignore_eos=True)
    base = LLM(path, dtype="f32", device_map="cuda", progress=False).generate(prompt, params)
    dmap = DeviceMap(layers=("cuda:0", "cpu", "cpu"), embed="cuda:0", head="cuda:0")
    llm = LLM(path, dtype="f32", device_map=dmap, progress=False)
    split = llm.generate(prompt, params)
    assert split.token_ids == base.token_ids
    assert not llm.engine.overlap  # a CPU segment reads its input on the host: no overlap
    assert sum(len(g.graphs) for g in llm.engine.runner.graphs.values()) >= 1  # the GPU segment used graphs
    assert (
        max(abs(a - b) for a, b in zip(split.prompt_logprobs[1:], base.prompt_logprobs[1:], strict=True))
        < 1e-4
    )


def test_prompt_logprobs_of_a_chunk_batched_with_sampling_rows(tiny_models):
    """A prefill chunk that does not sample, in a step where other sequences sample on the device, keeps its
    prompt logprobs (the step's results are read at once, not deferred)."""
    llm = LLM(str(tiny_models["llama"]), dtype="f32", progress=False, max_seq_len=256)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=True)
    prompts = [list(range(3, 43)), list(range(50, 107))]
    singles = [llm.generate(p, params) for p in prompts]
    llm.engine.scheduler.max_batched_tokens = 32  # the second prompt is chunked beside the first's decode
    batched = llm.generate(prompts, params)
    for s, b in zip(singles, batched, strict=True):
        assert len(b.prompt_logprobs) == len(s.prompt_logprobs)
        assert (
            max(abs(x - y) for x, y in zip(s.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True)) < 1e-5
        )

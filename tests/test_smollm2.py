"""The real SmolLM2-135M-Instruct GGUF against transformers loading the same file (fp32, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from spillover import LLM, SamplingParams

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Translate to French: good morning, my friend"}],
]


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2, dtype="f32", progress=False)


@pytest.fixture(scope="module")
def reference(smollm2):
    import transformers

    d, f = os.path.dirname(smollm2), os.path.basename(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


def test_prompt_logprobs_match_transformers(llm, reference):
    model, tok = reference
    # 150 tokens: more than the head computes at once (estimate.HEAD_MIN_ROWS), so the logits come in slices
    text = "The quick brown fox jumps over the lazy dog. In 1889, the Eiffel Tower was opened in Paris. " * 8
    ids = tok(text)["input_ids"][:150]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    got = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)).prompt_logprobs
    assert got[0] is None
    assert max(abs(a - b) for a, b in zip(got[1:], want, strict=True)) < 1e-4


@pytest.mark.parametrize("messages", PROMPTS, ids=["capital", "code", "system", "translate"])
def test_greedy_32_tokens_equal_transformers(llm, reference, messages):
    model, tok = reference
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert llm.tokenizer.encode_chat(messages) == list(ids)
    want = model.generate(
        torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    got = llm.generate(list(ids), SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert got.token_ids == want[0, len(ids) :].tolist()


def test_capital_of_france_is_paris(llm):
    out = llm.chat(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ends on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_streaming_equals_non_streaming(llm):
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=7)
    full = llm.chat(PROMPTS[1], params)
    parts = list(llm.chat(PROMPTS[1], params, stream=True))
    assert "".join(p.text for p in parts) == full.text
    assert sum((p.token_ids for p in parts), []) == full.token_ids
    assert parts[-1].finish_reason == full.finish_reason


def test_seed_makes_sampling_reproducible(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=123)
    a = llm.chat(PROMPTS[2], params).token_ids
    b = llm.chat(PROMPTS[2], params).token_ids
    c = llm.chat(PROMPTS[2], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=124)).token_ids
    assert a == b
    assert a != c


def test_stop_string_truncates_text(llm):
    out = llm.chat(PROMPTS[0], SamplingParams(max_tokens=32, temperature=0, stop=["Paris"]))
    assert out.finish_reason == "stop" and out.stop_reason == "Paris"
    assert "Paris" not in out.text and out.text.startswith("The capital")
    streamed = "".join(
        c.text
        for c in llm.chat(
            PROMPTS[0], SamplingParams(max_tokens=32, temperature=0, stop=["Paris"]), stream=True
        )
    )
    assert streamed == out.text


def test_logprobs_are_log_softmax_of_the_model(llm):
    ids = llm.tokenizer.encode_chat(PROMPTS[3])
    out = llm.generate(ids, SamplingParams(max_tokens=6, temperature=0, logprobs=3))
    check = llm.generate(
        ids + out.token_ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    )
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - check.prompt_logprobs[len(ids) + i]) < 1e-4
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_repetition_penalty_changes_greedy_output(llm):
    plain = llm.generate("one one one one one", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    penalised = llm.generate(
        "one one one one one",
        SamplingParams(max_tokens=8, temperature=0, repetition_penalty=2.0, ignore_eos=True),
    )
    assert plain.token_ids != penalised.token_ids


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"

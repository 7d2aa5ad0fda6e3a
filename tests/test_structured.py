"""Structured output: llguidance masks in the sampler, the SDK's SamplingParams constraints, and
`response_format` through the real server with the real `openai` client, on the real SmolLM2."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from pydantic import BaseModel, Field
from test_server import Server  # the real uvicorn server on a free port

from spillover import SamplingParams
from spillover.engine.sampler import apply_token_bitmask
from spillover.errors import ConfigError, GrammarError
from spillover.server.app import create_app
from spillover.structured.api import closed_objects

ASK = [{"role": "user", "content": "Describe a city as JSON."}]


class City(BaseModel):  # bounded fields: every sample ends well inside max_tokens
    name: str = Field(max_length=16)
    population: int = Field(ge=0, le=99_999_999)
    capital: bool


@pytest.fixture(scope="module")
def llm(smollm2):
    from spillover.llm import LLM

    return LLM(smollm2, progress=False, max_batch_size=4, max_seq_len=1024)


@pytest.fixture(scope="module")
def server(llm):
    from spillover.engine.async_engine import AsyncLLM

    async_llm = AsyncLLM(llm)
    srv = Server(create_app(async_llm))
    yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    srv.stop()
    async_llm.shutdown()


def test_bitmask_unpacks_bit_t_of_word_t_div_32():
    gen = torch.Generator().manual_seed(0)
    V = 100
    logits = torch.randn(3, V, generator=gen)
    allowed = torch.rand(2, V, generator=gen) < 0.3
    words = torch.zeros(2, (V + 31) // 32, dtype=torch.int64)
    for r, t in allowed.nonzero().tolist():
        words[r, t // 32] |= 1 << (t % 32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as int32 bit patterns
    out = logits.clone()
    apply_token_bitmask(out, words, [0, 2])
    assert torch.equal(out[1], logits[1])
    for row, r in ((0, 0), (2, 1)):
        assert torch.equal(out[row][allowed[r]], logits[row][allowed[r]])
        assert torch.isinf(out[row][~allowed[r]]).all()


def test_bitmask_of_every_row_masks_in_place():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 70, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (2, 3), generator=gen, dtype=torch.int64).to(torch.int32)
    one_by_one = logits.clone()
    for r in range(2):
        apply_token_bitmask(one_by_one, words[r : r + 1], [r])
    out = logits.clone()
    apply_token_bitmask(out, words, [0, 1])
    assert torch.equal(out, one_by_one) and torch.isinf(out).any() and not torch.isinf(out).all()


def test_parallel_masks_equal_one_row_masks(llm):
    """All rows filled in one call (llguidance's threads) equal each row filled alone, step after step, for
    rows of different grammars at different states (inside bounded strings, numbers, literals)."""
    g = llm.engine.grammars
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                      "minItems": 3}, "n": {"type": "integer"}},
              "required": ["xs", "n"], "additionalProperties": False}  # fmt: skip
    params = [SamplingParams(json_schema=schema)] * 4 + [
        SamplingParams(regex=r"[a-z]{2,9}( [0-9]+)*"),
        SamplingParams(choice=["alpha", "beta", "gamma"]),
    ]
    cs = [g.constraint(p) for p in params]
    gen = torch.Generator().manual_seed(3)
    V = g.vocab_size
    steps = 0
    while steps < 40 and not all(c.done for c in cs):
        live = [c for c in cs if not c.done]
        together = g.fill_bitmask(live)
        alone = torch.cat([g.fill_bitmask([c]) for c in live])
        # the masks are filled into uninitialised memory: compare with llguidance's own copy of each mask
        own = torch.stack(  # (compute_bitmask's bytes may run past the last word)
            [torch.frombuffer(bytearray(c.matcher.compute_bitmask()), dtype=torch.int32) for c in live]
        )[:, : together.shape[1]]
        assert torch.equal(together, alone) and torch.equal(together, own)
        logits = torch.randn(len(live), V, generator=gen)
        apply_token_bitmask(logits, together, list(range(len(live))))
        for c, t in zip(live, logits.argmax(-1).tolist(), strict=True):
            c.advance(t)
            assert not c.matcher.is_error()
        steps += 1
    assert steps >= 20


def test_a_grammar_is_validated_once_and_each_request_has_its_own_matcher(llm, monkeypatch):
    """The second request with the same schema skips validation; every request gets a matcher of its own
    (copies of one matcher would share its lexer and its lock, and fill their masks one at a time), so
    advancing one request's grammar leaves the others' alone."""
    import llguidance

    g = llm.engine.grammars
    p = SamplingParams(json_schema={"type": "object", "properties": {"q": {"type": "string"}}})
    a = g.constraint(p)
    made = []

    class Counted:  # llguidance.LLMatcher, counting the matchers made and the validations
        def __call__(self, *args, **kw):
            made.append("matcher")
            return real(*args, **kw)

        def __getattr__(self, name):
            if name == "validate_grammar":
                made.append("validate")
            return getattr(real, name)

    real = llguidance.LLMatcher
    monkeypatch.setattr(llguidance, "LLMatcher", Counted())
    b, c = g.constraint(p), g.constraint(p)
    assert made == ["matcher", "matcher"] and g.compile(p) is not None and len(made) == 2
    g.constraint(SamplingParams(regex="[0-9]+ apples"))  # the counting is real
    assert made[2:] == ["validate", "matcher"]
    for t in llm.tokenizer.encode('{"q": "x', add_special_tokens=False):
        a.advance(t)
    mask = lambda con: g.fill_bitmask([con])  # noqa: E731
    assert torch.equal(mask(b), mask(c)) and not torch.equal(mask(a), mask(b))


def test_params_take_one_constraint():
    with pytest.raises(ConfigError, match="at most one"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(ConfigError, match="choice"):
        SamplingParams(choice="yes")
    assert SamplingParams(json_schema={}).constrained and not SamplingParams().constrained


def test_sdk_constraints(llm):
    schema = City.model_json_schema()
    outs = llm.chat([ASK] * 3, SamplingParams(max_tokens=48, temperature=1.0, seed=5, json_schema=schema))
    for o in outs:  # batched: three constrained rows in one step
        assert o.finish_reason == "stop", o.text
        City.model_validate_json(o.text, strict=True)
    yes_no = llm.chat(
        [{"role": "user", "content": "Is Paris in France?"}], SamplingParams(choice=["yes", "no"])
    )
    assert yes_no.text in ("yes", "no") and yes_no.finish_reason == "stop"
    phone = llm.generate("Call me at", SamplingParams(max_tokens=16, regex=r"[0-9]{3}-[0-9]{4}"))
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", phone.text)


def test_sdk_bad_schema_is_a_clear_error(llm):
    with pytest.raises(GrammarError, match="json_schema cannot be compiled.*strin"):
        llm.chat(ASK, SamplingParams(json_schema={"type": "strin"}))
    with pytest.raises(GrammarError, match="regex"):
        llm.generate("x", SamplingParams(regex="(unclosed"))


def test_constrained_rows_join_overlapped_steps(llm):
    """With overlapped steps forced on (the GPU's bookkeeping, on the CPU), a constrained request that joins
    while an unconstrained step is in flight gets the synchronous run's tokens, and so does its neighbour;
    steps with constrained rows stay in flight too (the grammar takes the in-flight token in the next
    launch), and a sampled constrained row (seeded) draws what it draws synchronously."""
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    shaped = SamplingParams(
        max_tokens=40, temperature=0, json_schema=closed_objects(City.model_json_schema())
    )
    sampled = SamplingParams(
        max_tokens=40, temperature=0.8, seed=7, regex=r"(red|green|blue)( and (red|green|blue))*"
    )
    a_ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Tell me a story."}])
    b_ids = llm.tokenizer.encode_chat(ASK)
    c_ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Name some colours."}])
    kept = []

    def run(overlap: bool) -> list[list[int]]:
        llm.engine.overlap = overlap
        a = llm.engine.add_request(a_ids, plain)
        llm.engine.step()
        llm.engine.step()  # with overlap, this step is left in flight
        b = llm.engine.add_request(b_ids, shaped)
        c = llm.engine.add_request(c_ids, sampled)
        while llm.engine.has_work():
            llm.engine.step()
            f = llm.engine.in_flight
            kept.append(f is not None and any(s.seq.constraint is not None for s in f.sched.scheduled))
        for s in (a, b, c):
            llm.engine.requests.pop(s.seq.request_id, None)
        return [a.seq.output_ids, b.seq.output_ids, c.seq.output_ids]

    original = llm.engine.overlap
    try:
        sync = run(False)
        assert not any(kept)
        overlapped = run(True)
    finally:
        llm.engine.overlap = original
    assert overlapped == sync
    assert sum(kept) >= 10  # constrained steps were left in flight
    City.model_validate_json(llm.tokenizer.decode(sync[1]), strict=True)
    assert re.fullmatch(r"(red|green|blue)( and (red|green|blue))*", llm.tokenizer.decode(sync[2]))


def test_server_json_object_and_schema(server, llm):
    srv, client = server
    model = srv.server.config.app.state.spillover.model_name
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=48, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # 105 seeded samples at temperature 1, in one batch (7 concurrent calls of n=15): all parse and validate
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True},
    }

    def call(seed: int) -> list[tuple[str, str]]:
        r = client.chat.completions.create(model=model, messages=ASK, max_tokens=48, temperature=1.0, n=15,
                                           seed=100 * seed, response_format=fmt)  # fmt: skip
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.completion_tokens >= 15 * 8  # a JSON object of three fields, 15 choices
        return [(c.message.content, c.finish_reason) for c in r.choices]

    with ThreadPoolExecutor(7) as pool:
        texts = [t for batch in pool.map(call, range(7)) for t in batch]
    assert len(texts) >= 100
    for text, reason in texts:
        assert reason == "stop", text
        City.model_validate_json(text, strict=True)


def test_server_parse_with_pydantic_and_streaming(server):
    srv, client = server
    model = srv.server.config.app.state.spillover.model_name
    r = client.chat.completions.parse(
        model=model, messages=ASK, max_tokens=48, temperature=0, response_format=City
    )
    city = r.choices[0].message.parsed
    assert isinstance(city, City)
    stream = client.chat.completions.create(model=model, messages=ASK, max_tokens=48, temperature=0, stream=True,
                                            response_format={"type": "json_schema", "json_schema": {
                                                "name": "city", "schema": City.model_json_schema(), "strict": True}})  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert City.model_validate_json(text) == city


def test_server_bad_schema_is_a_400(server):
    srv, client = server
    model = srv.server.config.app.state.spillover.model_name
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
    }
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=ASK, response_format=bad, stream=stream)
        assert "strin" in e.value.message and e.value.body["param"] == "response_format"

"""Overlapped steps (engine launches step N+1 before reading step N's tokens) give the same results as
synchronous steps: same tokens and finish reasons, with stop tokens, preemption, aborts, streaming and a
mix of greedy and sampled requests. On the CPU overlap gains nothing, but the bookkeeping is the same one
the GPU uses, so it is forced on here."""

from __future__ import annotations

import pytest

from spillover import LLM, SamplingParams


def _llm(path: str, overlap: bool, **kw) -> LLM:
    llm = LLM(path, dtype="f32", progress=False, **kw)
    llm.engine.overlap = overlap
    return llm


PROMPTS = [list(range(5, 9)), list(range(30, 80)), list(range(100, 117)), list(range(200, 233))]


@pytest.fixture(scope="module")
def llama(tiny_models) -> str:
    return str(tiny_models["llama"])


def test_overlap_gives_the_synchronous_tokens(llama):
    sync = _llm(llama, False)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 17, 1, 9)]
    want = [sync.generate(p, q) for p, q in zip(PROMPTS, params, strict=True)]
    llm = _llm(llama, True)
    assert llm.engine.overlap
    for _ in range(2):  # the second round also checks that nothing is left in flight from the first
        got = [llm.generate(p, q) for p, q in zip(PROMPTS, params, strict=True)]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert all(g.finish_reason == "length" for g in got)
        batched = llm.generate(PROMPTS, params[1])
        assert [b.token_ids for b in batched] == [sync.generate(p, params[1]).token_ids for p in PROMPTS]
    blocks = llm.engine.scheduler.blocks
    llm.engine.step()  # resolves what may still be in flight
    assert blocks.num_free == blocks.num_blocks


def test_stop_token_found_one_step_late_is_dropped(llama):
    """A stop token is seen only after the next step was launched; that step's token must not leak out."""
    base = _llm(llama, False).generate(
        PROMPTS[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    )
    stop = base.token_ids[6]
    first = base.token_ids.index(stop)
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop], ignore_eos=True)
    llm = _llm(llama, True)
    outs = llm.generate([PROMPTS[1], PROMPTS[2]], params)
    assert outs[0].token_ids == base.token_ids[: first + 1]
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == stop
    assert outs[1].token_ids == _llm(llama, False).generate(PROMPTS[2], params).token_ids


def test_preemption_under_overlap(llama):
    """A KV pool too small for all requests preempts and recomputes; tokens equal the unconstrained run."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in _llm(llama, False).generate(PROMPTS, params)]
    llm = _llm(llama, True, max_seq_len=96, max_batch_size=1, pa_context_len=96)
    eng = llm.engine
    assert eng.scheduler.blocks.num_blocks * 16 < sum(len(p) + 24 for p in PROMPTS)
    states = [eng.add_request(p, params) for p in PROMPTS]
    while any(not s.seq.is_finished for s in states):
        eng.step()
    assert [s.final().token_ids for s in states] == want
    assert sum(s.seq.num_preemptions for s in states) > 0


def test_abort_while_in_flight_frees_everything(llama):
    llm = _llm(llama, True)
    eng = llm.engine
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    a = eng.add_request(PROMPTS[1], params)
    b = eng.add_request(PROMPTS[2], params)
    for _ in range(6):
        eng.step()
    assert eng.in_flight is not None
    eng.abort(a.seq.request_id)
    while not b.seq.is_finished:
        eng.step()
    eng.step()
    assert b.final().token_ids == _llm(llama, False).generate(PROMPTS[2], params).token_ids
    assert eng.in_flight is None and not eng.has_work()
    assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks


def test_streaming_and_mixed_sampling_under_overlap(llama):
    llm = _llm(llama, True)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    chunks = list(llm.generate(PROMPTS[3], greedy, stream=True))
    assert [t for c in chunks for t in c.token_ids] == _llm(llama, False).generate(
        PROMPTS[3], greedy
    ).token_ids
    assert chunks[-1].finish_reason == "length"
    # a seeded sampled request next to a greedy one (sampled on the device, deferred like greedy) and one
    # with logprobs (read on the host at once): each gives what it gives alone without overlap
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    with_lp = SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    jobs = [(PROMPTS[0], sampled), (PROMPTS[3], greedy), (PROMPTS[2], with_lp)]
    sync = _llm(llama, False)
    want = [sync.generate(p, q) for p, q in jobs]
    mixed = [llm.engine.add_request(p, q) for p, q in jobs]
    while not all(s.seq.is_finished for s in mixed):
        llm.engine.step()
    got = [s.final() for s in mixed]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [t.logprob for t in got[2].logprobs] == pytest.approx(
        [t.logprob for t in want[2].logprobs], abs=1e-5
    )
    assert got[0].token_ids != sync.generate(PROMPTS[0], greedy).token_ids  # the sampled one did sample

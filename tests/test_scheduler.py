"""The continuous-batching scheduler on its own (no tensors): admission, chunked prefill, preemption and
resume, prefix sharing, and random workloads where no request is lost or answered twice."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spillover.engine.sampling import SamplingParams
from spillover.engine.scheduler import Scheduler
from spillover.engine.sequence import Sequence, Status
from spillover.kv.block_manager import BlockManager

BS = 4


def make_seq(prompt: list[int], max_tokens: int, **kw) -> Sequence:
    return Sequence(list(prompt), SamplingParams(max_tokens=max_tokens, **kw), request_id=str(prompt[:3]))


def next_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context, like a real one."""
    return (sum(tokens) * 31 + len(tokens)) % 97


class FakeEngine:
    """Plays the engine's part: runs what is scheduled, samples `next_token`, finishes at max_tokens."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.finished: list[Sequence] = []

    def step(self) -> None:
        out = self.sched.schedule()
        self.check_writes(out)
        self.sched.advance(out)
        for s in out.scheduled:
            if s.samples:
                seq = s.seq
                seq.output_ids.append(next_token(seq.tokens))
                if len(seq.output_ids) >= seq.params.max_tokens:
                    seq.finish_reason = "length"
                    self.sched.finish(seq)
                    self.finished.append(seq)

    def check_writes(self, out) -> None:
        """Every token written this step lands in a block its sequence does not share; within budget."""
        assert out.num_tokens <= self.sched.max_batched_tokens
        bm = self.sched.blocks
        for s in out.scheduled:
            assert s.q_len >= 1 and s.start == s.seq.num_computed
            assert s.start + s.q_len <= s.seq.num_tokens
            assert len(s.seq.block_table) * BS >= s.start + s.q_len
            for pos in range(s.start, s.start + s.q_len):
                assert bm.ref[s.seq.block_table[pos // BS]] == 1, "a write into a shared block"


def check_refcounts(sched: Scheduler, live: list[Sequence]) -> None:
    bm = sched.blocks
    counts = [0] * bm.num_blocks
    for seq in live:
        for b in seq.block_table:
            counts[b] += 1
    assert counts == bm.ref
    assert bm.num_free == sum(1 for c in counts if c == 0)


def expected_output(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


def test_admission_and_chunked_prefill():
    sched = Scheduler(BlockManager(64, BS), max_batched_tokens=8)
    a, b = make_seq(list(range(1, 21)), 3), make_seq(list(range(30, 33)), 3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.seq, s.start, s.q_len) for s in out.scheduled] == [
        (a, 0, 8)
    ]  # budget spent on a's first chunk
    sched.advance(out)
    out = sched.schedule()
    assert [(s.start, s.q_len, s.samples) for s in out.scheduled] == [(8, 8, False)]
    sched.advance(out)
    out = sched.schedule()  # a's last 4 prompt tokens, then b's prompt in the same step
    assert [(s.seq, s.start, s.q_len, s.samples) for s in out.scheduled] == [
        (a, 16, 4, True),
        (b, 0, 3, True),
    ]


def test_preemption_and_resume_by_recompute():
    sched = Scheduler(BlockManager(6, BS), max_batched_tokens=64)
    eng = FakeEngine(sched)
    a, b = make_seq([1, 2, 3, 4, 5, 6, 7], 12), make_seq([9, 8, 7, 6, 5, 4, 3], 12)
    sched.add(a)
    sched.add(b)
    for _ in range(200):
        if not sched.has_work():
            break
        eng.step()
        check_refcounts(sched, sched.running)
    assert {s.request_id for s in eng.finished} == {a.request_id, b.request_id}
    assert a.num_preemptions + b.num_preemptions > 0  # 6 blocks cannot hold 2 x 19 tokens at once
    for s in (a, b):
        assert s.output_ids == expected_output(s.prompt_ids, 12)
    assert sched.blocks.num_free == 6


def test_prefix_sharing_skips_cached_blocks_but_not_the_last_token():
    sched = Scheduler(BlockManager(32, BS), max_batched_tokens=64)
    eng = FakeEngine(sched)
    prompt = list(range(1, 13))  # exactly 3 full blocks
    first = make_seq(prompt, 2)
    sched.add(first)
    while sched.has_work():
        eng.step()
    again = make_seq(prompt, 2)
    sched.add(again)
    out = sched.schedule()
    # blocks 0-1 come from the cache; block 2 holds the last prompt token, which must be computed
    assert [(s.start, s.q_len) for s in out.scheduled] == [(8, 4)]
    assert again.num_cached_prompt == 8
    sched.advance(out)
    again.output_ids.append(0)
    logprobs = make_seq(prompt, 2, prompt_logprobs=True)
    sched.add(logprobs)
    out = sched.schedule()
    assert [(s.seq is logprobs, s.start) for s in out.scheduled] == [(False, 12), (True, 0)]  # no skipping


def test_abort_frees_blocks_and_waiting_requests():
    sched = Scheduler(BlockManager(16, BS), max_batched_tokens=64)
    a, b = make_seq(list(range(1, 10)), 5), make_seq(list(range(1, 10)), 5)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.abort(a)
    sched.abort(b)
    assert a.status is Status.FINISHED and b.finish_reason == "abort"
    assert not sched.has_work() and sched.blocks.num_free == 16


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(8, 40),
    budget=st.integers(4, 48),
    max_num_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
    reqs=st.lists(
        st.tuples(
            st.integers(1, 3), st.integers(1, 22), st.integers(1, 12), st.integers(0, 6), st.booleans()
        ),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 1000),
)
def test_random_workloads_lose_nothing(num_blocks, budget, max_num_seqs, prefix_caching, reqs, seed):
    """Requests arrive over time, some are aborted; each one ends exactly once with the right tokens."""
    rng = random.Random(seed)
    sched = Scheduler(BlockManager(num_blocks, BS, prefix_caching), budget, max_num_seqs)
    eng = FakeEngine(sched)
    capacity = num_blocks * BS
    pending = []
    for family, plen, max_tokens, arrive, abort in reqs:
        prompt = [family] * 5 + list(range(plen))  # shared prefixes within a family
        max_tokens = max(
            1, min(max_tokens, capacity - len(prompt) - BS)
        )  # a sequence never outgrows the pool
        if len(prompt) + max_tokens > capacity - BS:
            continue
        pending.append((arrive, make_seq(prompt, max_tokens), abort))
    added: list[Sequence] = []
    aborted: list[Sequence] = []
    for step in range(2000):
        for arrive, seq, _ in pending:
            if arrive == step:
                sched.add(seq)
                added.append(seq)
        live = [s for s in added if not s.is_finished]
        victims = [s for (_, s, ab) in pending if ab and s in live]
        if victims and rng.random() < 0.2:
            sched.abort(victims[0])
            aborted.append(victims[0])
        if not sched.has_work() and step > max(a for a, _, _ in pending or [(0, None, None)]):
            break
        eng.step()
        check_refcounts(sched, [s for s in added if not s.is_finished])
    else:
        raise AssertionError("the workload did not drain")
    ids = [s.seq_id for s in eng.finished]
    assert len(ids) == len(set(ids)), "a request was answered twice"
    assert {s.seq_id for s in eng.finished} | {s.seq_id for s in aborted} == {s.seq_id for s in added}
    assert not {s.seq_id for s in eng.finished} & {s.seq_id for s in aborted}
    for s in eng.finished:
        assert s.output_ids == expected_output(s.prompt_ids, s.params.max_tokens)
    assert sched.blocks.num_free == num_blocks

"""The head's logits in slices (engine/runner.py `_logits`): a step of many rows (every running sequence's
decode, a chunk's prompt logprobs) computes, samples and scores its logits a slice at a time, so its transients
stay inside what the plan reserves (estimate.head_activation_bytes), and the results are those of the whole
step at once. The real SmolLM2 GGUF (f32), transformers as the reference."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import spillover.engine.runner as runner_module
from spillover import LLM, SamplingParams
from spillover.placement import estimate as E

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1889, the Eiffel Tower was opened in Paris, and it was "
    "the tallest structure in the world for forty years. "
)


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2, dtype="f32", progress=False)


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the CPU tensors created inside the mode and alive at once (views count with the
    storage they share; tensors made before the mode, such as weights, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.cur = self.peak = 0

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[ptr]
                self.cur -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)
        }
        for t in tree_flatten(out)[0]:
            if not torch.is_tensor(t) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.live:
                if ptr in inputs:  # in place, or a view of a tensor made outside
                    continue
                self.live[ptr] = [storage.nbytes(), 0]
                self.cur += storage.nbytes()
                self.peak = max(self.peak, self.cur)
            self.live[ptr][1] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


def _run(llm, requests, head_rows: int, sampler_rows: int, monkeypatch) -> tuple[list, list[int], list[int]]:
    """`requests` [(ids, params)] in one batch, the head in slices of `head_rows` rows and the sampler in
    slices of `sampler_rows`: (outputs, rows of each head call, rows of each sampler call)."""
    runner = llm.engine.runner
    heads, draws = [], []
    head, draw = runner.model.head, runner_module.sample_rows

    def counted_head(x):  # noqa: ANN001, ANN202
        heads.append(x.shape[0])
        return head(x)

    def counted_draw(logits, params, gens):  # noqa: ANN001, ANN202
        draws.append(logits.shape[0])
        return draw(logits, params, gens)

    monkeypatch.setattr(runner, "head_rows", head_rows)
    monkeypatch.setattr(runner, "sampler_rows", sampler_rows)
    monkeypatch.setattr(runner.model, "head", counted_head)
    monkeypatch.setattr(runner_module, "sample_rows", counted_draw)
    states = [llm.engine.add_request(ids, p) for ids, p in requests]
    while any(not s.seq.is_finished for s in states):
        llm.engine.step()
    monkeypatch.undo()
    return [llm._finish(s) for s in states], heads, draws


def _requests(llm) -> list[tuple[list[int], SamplingParams]]:
    def ids(i: int) -> list[int]:
        return llm.encode(f"Item {i}: the best thing about number {i * 7} is")

    seeded = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)
    penalties = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3)
    reqs = [(ids(i), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)) for i in range(3)]
    reqs += [(ids(3 + i), SamplingParams(max_tokens=6, seed=i, ignore_eos=True, **seeded)) for i in range(3)]
    reqs += [
        (ids(6 + i), SamplingParams(max_tokens=6, seed=10 + i, logprobs=3, ignore_eos=True, **penalties))
        for i in range(2)
    ]
    reqs += [
        (ids(8 + i), SamplingParams(max_tokens=6, temperature=0.7, seed=20 + i, logprobs=2, json_schema={}))
        for i in range(2)
    ]
    reqs.append(
        (llm.encode(TEXT), SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=True, logprobs=1))
    )
    return reqs


def test_sliced_sampling_gives_the_unsliced_tokens_and_logprobs(llm, monkeypatch):
    """Greedy, seeded top-k/top-p/min-p, penalties, logprobs, a JSON grammar and prompt logprobs in one batch:
    the sampler and the log-softmaxes on slices of 2 rows give exactly the tokens and logprobs of the whole
    step at once; the head on slices of 3 rows too, but for the last bits of the logprobs (a GEMM of 3 rows
    need not add in the order of one of 12: the whole step's own logits already change with how many
    sequences share it)."""
    reqs = _requests(llm)
    whole, heads, draws = _run(llm, reqs, 10**6, 10**6, monkeypatch)
    assert max(heads) > 11 and max(draws) == 11  # one step held them all
    sampled, heads, draws = _run(llm, reqs, 10**6, 2, monkeypatch)
    assert max(heads) > 11 and max(draws) == 2
    for a, b in zip(sampled, whole, strict=True):
        assert (a.token_ids, a.logprobs, a.prompt_logprobs) == (b.token_ids, b.logprobs, b.prompt_logprobs)
    sliced, heads, draws = _run(llm, reqs, 3, 2, monkeypatch)
    assert max(heads) == 3 and max(draws) == 2
    for a, b in zip(sliced, whole, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
        if b.prompt_logprobs is not None:
            assert (
                max(abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True))
                < 1e-4
            )
    assert all(len(o.token_ids) == 6 for o in whole[:8])
    assert all(o.logprobs and len(o.logprobs[0].top) == 3 for o in whole[6:8])
    assert len(whole[-1].prompt_logprobs) == len(reqs[-1][0])


def test_long_prompt_logprobs_in_planned_slices_equal_the_whole_chunk(llm, monkeypatch):
    """A 300-token prompt's logprobs, computed in the planned slices (64 rows of head, 8 of log-softmax), are
    the unsliced ones (test_smollm2 checks them against transformers, over several slices)."""
    ids = llm.encode(TEXT * 10)[:300]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    runner = llm.engine.runner
    assert (runner.head_rows, runner.sampler_rows) == (64, 8)  # the plan's, for max_batch_size 1
    (sliced,), heads, _ = _run(llm, [(ids, params)], 64, 8, monkeypatch)
    assert heads == [64, 64, 64, 64, 44]
    (whole,), heads, _ = _run(llm, [(ids, params)], 10**6, 10**6, monkeypatch)
    assert heads == [300]
    assert sliced.prompt_logprobs[0] is None and len(sliced.prompt_logprobs) == 300
    diffs = [abs(a - b) for a, b in zip(sliced.prompt_logprobs[1:], whole.prompt_logprobs[1:], strict=True)]
    assert max(diffs) < 1e-4


def test_head_transients_stay_inside_the_plan_at_any_number_of_rows(llm, monkeypatch):
    """100 sequences decoding with top-p, penalties and logprobs (the sampler's largest transients), and a
    300-token prompt's logprobs: what `_sample` allocates at its peak stays inside the plan's head reserve for
    max_batch_size 1, and the runner slices at the plan's rows."""
    runner = llm.engine.runner
    mbs = llm.params.max_batch_size
    assert (runner.head_rows, runner.sampler_rows) == (E.head_rows(mbs), E.sampler_rows(mbs))
    reserve = E.head_activation_bytes(llm.config, "f32", mbs)
    peaks: list[tuple[int, int]] = []
    sample = runner._sample

    def measured(sched, hidden, prev=None):  # noqa: ANN001, ANN202
        with LiveBytes() as live:
            out = sample(sched, hidden, prev)
        peaks.append((hidden.shape[0], live.peak))
        return out

    monkeypatch.setattr(runner, "_sample", measured)
    heavy = SamplingParams(max_tokens=2, temperature=0.8, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5,
                           logprobs=5, ignore_eos=True)  # fmt: skip
    llm.generate([f"Number {i} is" for i in range(100)], heavy)
    llm.generate(
        llm.encode(TEXT * 10)[:300], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    )
    rows, peak = max(peaks, key=lambda p: p[1])
    assert max(r for r, _ in peaks) >= 100
    # the unsliced step would hold at least its fp32 logits: 100 x 49152 x 4 B = 19.7 MB, plus the sampler's
    assert 0 < peak <= reserve, (rows, peak, reserve)

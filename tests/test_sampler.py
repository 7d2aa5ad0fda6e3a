"""Batched sampling on the logits' device (`sample_rows`): greedy rows, the sampled distribution, the
top-k / top-p / min-p filters, and seeded rows that repeat."""

from __future__ import annotations

import torch

from spillover.engine.sampler import sample_rows
from spillover.engine.sampling import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draws(params: SamplingParams, n: int = 20000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return sample_rows(LOGITS.repeat(n, 1), [params] * n, [None] * n)


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(top_k=1)] + [
        SamplingParams(temperature=0)
    ] * 2
    got = sample_rows(logits, params, [None] * 5)
    best = logits.argmax(-1)
    assert got[[0, 2, 3, 4]].tolist() == best[[0, 2, 3, 4]].tolist()


def test_sampled_frequencies_follow_the_softmax():
    for t in (0.7, 1.0, 1.5):
        freq = torch.bincount(draws(SamplingParams(temperature=t)), minlength=6).float() / 20000
        want = torch.softmax(LOGITS / t, -1)
        assert (freq - want).abs().max() < 0.015, (t, freq, want)


def test_filters_remove_what_they_should():
    assert set(draws(SamplingParams(top_k=2)).tolist()) == {0, 1}
    # top_p 0.75: softmax(LOGITS) is [.57, .21, .13, ...]: the nucleus reaching 0.75 is tokens 0, 1
    nucleus = draws(SamplingParams(top_p=0.75))
    assert set(nucleus.tolist()) == {0, 1}
    freq = torch.bincount(nucleus, minlength=2).float()[:2] / len(nucleus)
    p = torch.softmax(LOGITS, -1)[:2]
    assert (freq - p / p.sum()).abs().max() < 0.015  # renormalised over what is kept
    # min_p 0.2: keeps tokens with p >= 0.2 * 0.57 = 0.114 -> tokens 0, 1, 2
    assert set(draws(SamplingParams(min_p=0.2)).tolist()) == {0, 1, 2}


def test_seeded_rows_repeat_and_ignore_the_global_rng():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, seed=7)] * 3

    def run(global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)
        gens = [torch.Generator().manual_seed(7) for _ in range(3)]
        return [sample_rows(logits, params, gens).tolist() for _ in range(4)]

    first = run(0)
    assert first == run(123)
    assert len({tuple(x) for x in first}) > 1  # the generator advances from step to step

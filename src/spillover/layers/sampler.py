"""Token sampling from logits: penalties, temperature, top-k, top-p, min-p, seeded generators, logprobs."""

from __future__ import annotations

import torch

from spillover.engine.sampling import SamplingParams


def apply_penalties(
    logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """logits: [V] fp32 (modified copy)."""
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device, dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(output, device=logits.device).unique(return_counts=True)
        logits[ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
    return logits


def sample_one(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: [V] fp32 after penalties -> a token id."""
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sp, idx = probs.sort(descending=True)
        cum = sp.cumsum(-1)
        drop = cum - sp > p.top_p  # keep the smallest set whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp)
    return int(torch.multinomial(probs, 1, generator=gen))


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    v, i = logprobs.topk(k)
    return list(zip(i.tolist(), v.tolist(), strict=True))

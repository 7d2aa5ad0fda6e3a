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


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> torch.Tensor:
    """logits: [N, V] fp32 (penalties applied) -> [N] token ids, on the logits' device, with no host sync.

    Greedy rows take the argmax. The others sample softmax(logits / T) after top-k, min-p and top-p, by an
    exponential race: argmax(p / E) with E ~ Exp(1) per token picks token i with probability p_i (the
    distribution of multinomial), and lets each seeded row draw its noise from its own generator.
    """
    greedy = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy
    dev, V = logits.device, logits.shape[-1]

    def col(values: list[float]) -> torch.Tensor:  # one value per row -> [N, 1] on the device, no sync
        return torch.tensor(values, dtype=logits.dtype).to(dev, non_blocking=True)[:, None]

    x = logits / col([1.0 if p.greedy else p.temperature for p in params])
    ks = [min(p.top_k, V) if p.top_k > 0 and not p.greedy else V for p in params]
    if min(ks) < V:
        kth = x.topk(max(ks), dim=-1).values  # [N, max k]
        idx = torch.tensor(ks).to(dev, non_blocking=True)[:, None] - 1
        x = x.masked_fill(x < kth.gather(1, idx), float("-inf"))
    probs = x.softmax(-1)
    if any(p.min_p > 0 for p in params):
        probs = probs.masked_fill(probs < col([p.min_p for p in params]) * probs.amax(-1, keepdim=True), 0.0)
    if any(p.top_p < 1.0 for p in params):
        sp, order = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > col([p.top_p for p in params])  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sp.masked_fill(drop, 0.0))
    noise = torch.empty_like(probs).exponential_()
    for i, g in enumerate(gens):
        if g is not None:
            noise[i].exponential_(generator=g)
    sampled = (probs / noise).argmax(-1)
    is_greedy = torch.tensor([p.greedy for p in params]).to(dev, non_blocking=True)
    return torch.where(is_greedy, greedy, sampled)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Grammar masks, in place: logits [N, V]; bitmask [len(rows), ceil(V / 32)] int32 (bit t of word t // 32
    set = token t allowed), one per listed row. Unpacked on the logits' device in one batched op. For a GPU,
    `bitmask` should be in pinned memory: then the copy does not wait for the kernels queued before it."""
    dev, V = logits.device, logits.shape[-1]
    words = bitmask.to(dev, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=dev)
    banned = ((words[:, :, None] >> bits) & 1 == 0).flatten(1)[:, :V]  # [R, V]
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):  # every row: no gather / scatter
        logits.masked_fill_(banned, float("-inf"))
        return
    idx = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
    logits[idx] = logits[idx].masked_fill(banned, float("-inf"))


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    v, i = logprobs.topk(k)
    return list(zip(i.tolist(), v.tolist(), strict=True))

"""Mixture-of-experts building blocks: top-k routing and the experts of one layer as stacked weights.

`Experts` holds every expert's SwiGLU MLP as 3-D parameters, like llama.cpp's `ffn_*_exps`:
`gate_up_proj` [E, 2I, H] (gate rows then up rows per expert) and `down_proj` [E, H, I]. The experts are their
own stage (`layers.<i>.experts`, models/base.py): they may live on another device than the rest of their
layer. They compute where their weights are: the step's hidden states go there once per layer (one copy, not
one per expert) and the combined result comes back.

- Grouped: the (token, slot) pairs are sorted by expert and each expert that got tokens runs once on its rows
  (a loop over the hit experts only: 8 of 128 for a Qwen3-30B-A3B decode token). Reads only the chosen
  experts' bytes. Used on the CPU, for prompts, and for quantized experts.
- Gathered: the chosen experts' weights are indexed into one batch and multiplied by `bmm`; no host sync, so
  CUDA graphs can capture it (GPU decode, up to GATHER_MAX_ROWS pairs).

ISQ (`quantize_`): each expert's matrices become the quantized linears of quant/isq.py (int4 / int8 CPU
kernels, Triton GEMVs on CUDA), in the grouped path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATHER_MAX_ROWS = 64
"""Most (token, slot) pairs the gathered path takes on a GPU (batch 8 at top-8). It copies the chosen experts'
weights once more than the grouped path reads them, which stays cheaper than a host sync per layer only for
decode-sized steps."""


def route_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (expert ids [T, k], weights [T, k] in fp32): softmax over all experts in fp32,
    the k largest, renormalized to sum to 1 when `normalize` (Mixtral; Qwen3-MoE's norm_topk_prob)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))  # [E, H, I]
        self.q_gate_up: nn.ModuleList | None = None  # after ISQ: one quantized linear per expert
        self.q_down: nn.ModuleList | None = None
        # experts in CPU memory, a GPU step of at least this many (token, slot) pairs: the hit experts are
        # copied to the GPU and computed there (prefill; the loader sets it from the cost model). None: never
        self.stream_pairs: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def quantized(self) -> bool:
        return self.q_gate_up is not None or self.q_down is not None

    def gathers(self, rows: int, device: torch.device) -> bool:
        """Whether `rows` (token, slot) pairs take the gathered path (no host sync) on `device`."""
        if device.type != "cuda" or self.quantized:
            return False
        return rows <= GATHER_MAX_ROWS or torch.cuda.is_current_stream_capturing()  # graphs: no host sync

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, H]; idx, w [T, k] (chosen experts, their weights) -> sum_j w[t, j] * expert_idx[t, j](x[t])."""
        src, home = x.device, self.device
        T, k = idx.shape
        if home != src and self.streams(T * k, src):
            y = self._grouped(x, idx, stream=True)  # the hit experts' weights go to the GPU instead
            return (y.view(T, k, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)
        if home != src:  # experts in another memory (CPU): the step's rows go there once, the result back
            x, idx, w = x.to(home), idx.to(home), w.to(home)
        y = self._gathered(x, idx) if self.gathers(T * k, home) else self._grouped(x, idx)  # [T*k, H]
        out = (y.view(T, k, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)  # [T, H]
        return out.to(src) if home != src else out

    def streams(self, rows: int, device: torch.device) -> bool:
        """Whether a step of `rows` pairs on `device` copies the hit CPU-resident experts there (prefill)."""
        limit = self.stream_pairs
        return limit is not None and rows >= limit and device.type == "cuda" and not self.quantized

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat, k = idx.reshape(-1), idx.shape[1]
        xr = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
        gu = torch.bmm(self.gate_up_proj[flat], xr).squeeze(-1)  # [T*k, 2I]
        h = _swiglu(gu, self.inter).unsqueeze(-1)  # [T*k, I, 1]
        return torch.bmm(self.down_proj[flat], h).squeeze(-1)  # [T*k, H]

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, stream: bool = False) -> torch.Tensor:
        flat, k = idx.reshape(-1), idx.shape[1]
        experts, order = torch.sort(flat, stable=True)  # (token, slot) pairs grouped by expert
        hit, counts = torch.unique_consecutive(experts, return_counts=True)
        xs = x[order // k]  # [T*k, H], rows of each expert together
        ys = torch.empty_like(xs)
        start = 0
        for e, n in zip(hit.tolist(), counts.tolist(), strict=True):  # only the experts that got tokens
            ys[start : start + n] = self._expert(e, xs[start : start + n], x.device if stream else None)
            start += n
        y = torch.empty_like(ys)
        y[order] = ys
        return y  # [T*k, H] in (token, slot) order

    def _expert(self, e: int, x: torch.Tensor, to: torch.device | None = None) -> torch.Tensor:  # [n, H]
        if to is not None:  # streamed: this expert's weights copied to x's device
            h = _swiglu(F.linear(x, self.gate_up_proj[e].to(to, non_blocking=True)), self.inter)
            return F.linear(h, self.down_proj[e].to(to, non_blocking=True))
        gu = self.q_gate_up[e](x) if self.q_gate_up is not None else F.linear(x, self.gate_up_proj[e])
        h = _swiglu(gu, self.inter)
        return self.q_down[e](h) if self.q_down is not None else F.linear(h, self.down_proj[e])

    @torch.no_grad()
    def quantize_(self, attr: str, bits: int, work: torch.device | None, device: torch.device | str) -> None:
        """Replace the stacked weight `attr` (read into CPU memory) by one quantized linear per expert on
        `device`. On the CPU the int4 weights keep only torch's kernel layout (no dense bf16 copy: an expert
        sees few rows per step)."""
        from spillover.quant.isq import quantize_linear

        stacked = getattr(self, attr)  # [E, out, in]
        on_cpu = torch.device(device).type == "cpu"
        mods = []
        for e in range(self.num_experts):
            lin = nn.Linear(stacked.shape[2], stacked.shape[1], bias=False, device="meta")
            lin.weight = nn.Parameter(stacked[e], requires_grad=False)
            q = quantize_linear(lin, bits, on_cpu, work, device)
            if getattr(q, "dense", None) is not None:
                q.dense = None
            mods.append(q)
        delattr(self, attr)
        setattr(self, "q_gate_up" if attr == "gate_up_proj" else "q_down", nn.ModuleList(mods))


def _swiglu(gu: torch.Tensor, inter: int) -> torch.Tensor:
    gate, up = gu.split(inter, dim=-1)
    return F.silu(gate) * up

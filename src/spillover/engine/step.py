"""What one step is made of: the host-side inputs (`StepInputs`, per KV group `GroupInputs`), what the
layers on one device read (`StepContext`), the one layer loop every executor calls (`run_layers`: resident
segments, CUDA graphs, offload, tensor-parallel shards), and a launched step's results (`StepFuture`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spillover.engine.kv_cache import KVCaches
from spillover.engine.scheduler import SchedulerOutput
from spillover.engine.sequence import TokenLogprob
from spillover.layers.attention import AttnMeta
from spillover.models.base import LayerInput


@dataclass
class SeqResult:
    seq_id: int
    token: int | None = None  # sampled token (None: prefill chunk that does not reach the end)
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[float | None] = field(default_factory=list)  # appended to the sequence's list


@dataclass
class StepFuture:
    """A launched step. Steps whose tokens are drawn on the device keep them there until `result()`: the
    engine launches the next step first, so the host's bookkeeping overlaps with the GPU (see Engine.step)."""

    results: list[SeqResult] | None  # ready results (steps that sample on the host)
    sched: SchedulerOutput
    tokens: torch.Tensor | None = None  # [N] sampled token ids, on the head device
    host: torch.Tensor | None = None  # [N] their copy in host memory (pinned; complete once `event` is)
    event: Any = None  # torch.cuda.Event recorded after the copy (None on the CPU)
    rows: dict[int, int] = field(default_factory=dict)  # seq_id -> index in `tokens`
    kept: bool = False  # left in flight by the engine: its sequences count the token as pending

    @property
    def deferred(self) -> bool:
        return self.results is None

    def result(self) -> list[SeqResult]:
        if self.results is None:
            if self.event is not None:
                self.event.synchronize()
            toks = self.host.tolist()
            self.results = [
                SeqResult(s.seq.seq_id, toks[self.rows[s.seq.seq_id]] if s.seq.seq_id in self.rows else None)
                for s in self.sched.scheduled
            ]
        return self.results


@dataclass
class GroupInputs:
    """Host-side slot numbers of one KV group (full attention or one sliding window) for one step."""

    slots: torch.Tensor  # [T] cache slot of each new token
    decode_slots: torch.Tensor | None  # [Bd, L] slots each decoding sequence attends to (padded)
    decode_lens: list[int]  # how many of them are real
    # (row, q_len, ctx_len, context slots or None, mask [q_len, ctx_len] or None, fresh): see PrefillSlice
    prefills: list[tuple[int, int, int, torch.Tensor | None, torch.Tensor | None, bool]]


@dataclass
class StepInputs:
    """Host-side tensors for one step (built once, copied to each device that runs layers)."""

    ids: torch.Tensor  # [T]
    pos: torch.Tensor  # [T]
    decode_rows: list[int]
    logit_rows: list[int]
    max_len: int
    groups: dict[int | None, GroupInputs]  # by sliding window (None: full attention)
    prefill_rows: int = 0  # sequences prefilling this step
    pending: list[tuple[int, int]] = field(default_factory=list)  # (row, index in the previous step's tokens)
    mpos: torch.Tensor | None = None  # [3, T] multimodal rope positions, when a chunk holds image tokens
    images: list[tuple[int, int, int, Any]] = field(default_factory=list)  # (row, start, q_len, seq)
    cross: list[tuple[int, int, int, Any]] = field(default_factory=list)  # cross-attention models: the same

    @property
    def all_decode(self) -> bool:
        return not self.prefill_rows and self.decode_rows == list(range(len(self.decode_rows)))


@dataclass
class StepContext:
    """What the layers on one device read in one step: rotary tables by rope kind, attention metadata by KV
    group, and the caches."""

    ropes: dict[str, tuple[torch.Tensor, torch.Tensor]]  # rope kind -> (cos, sin) [T, rot_dim]
    metas: dict[int | None, AttnMeta]  # sliding window (None: full) -> metadata
    caches: KVCaches
    cross: Any = None  # cross-attention models: LayerInput.cross
    out_rows: torch.Tensor | None = None  # the rows the head reads if not all: LayerInput.out_rows of `last`
    last: int = -1

    def layer_input(self, i: int) -> LayerInput:
        spec = self.caches.specs[i]
        cos, sin = self.ropes[spec.rope]
        meta = self.metas[spec.kv.sliding_window]
        out = self.out_rows if i == self.last else None
        return LayerInput(cos, sin, meta, self.caches.k[i], self.caches.v[i], self.cross, out)


@dataclass
class CrossRows:
    """One sequence's rows in a step, for cross-attention layers (LayerInput.cross; models/mllama.py)."""

    row: int
    q_len: int
    mm: Any  # multimodal.MMInput: embeds (the projected vision states, until every layer made its K/V), cross_kv
    allowed: torch.Tensor  # [q_len, vision tokens] bool: what each row attends to
    keep: torch.Tensor  # [q_len, 1]: 0 for rows that see no image (their MLP output is dropped)


def run_layers(
    layers: torch.nn.ModuleList, x: torch.Tensor, a: int, b: int, ctx: StepContext
) -> torch.Tensor:
    """The layer loop: layers a..b-1 on the device `ctx` was built for (x: [T, H] there)."""
    for i in range(a, b):
        x = layers[i](x, ctx.layer_input(i))
    return x

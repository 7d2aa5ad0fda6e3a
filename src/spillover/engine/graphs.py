"""CUDA graphs of a GPU segment's decode step (one per batch and context bucket), captured at load or on
first use into one pool per GPU, shared by its segments, never beyond the buckets the plan reserved the pool
for; the runner replays them for decode-only steps that fit and runs the others eagerly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from spillover.engine.step import StepContext, StepInputs, run_layers
from spillover.layers.attention import AttnMeta

if TYPE_CHECKING:
    from spillover.engine.runner import ModelRunner


def _bucket(n: int, floor: int) -> int:
    b = floor
    while b < n:
        b *= 2
    return b


def _powers(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... up to hi (inclusive)."""
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    return out


class DecodeGraphs:
    """CUDA graphs of one GPU segment's decode step, one per (batch bucket, context-length bucket).

    A decode step launches a few hundred small kernels; replaying a captured graph removes the per-kernel
    launch and Python overhead. Shapes are padded to buckets (batch: powers of two; context: powers of two
    from 256) so a handful of graphs serve every step. Padded rows write their K/V to the runner's scratch
    slot and attend only to it; their outputs are dropped. Graphs are captured by `capture_all` (LLM() does
    at load, up to the mapping sizes; the plan reserves the pool: estimate.graph_pool_bytes) or on first use,
    into one shared memory pool (only one runs at a time, and each graph's output buffer stays allocated).

    The pool holds the transients of the largest graph captured first (the smaller ones reuse its memory), so
    no graph is ever larger than `top`: the largest bucket the plan reserved (the runner's `graph_sizes`), or
    the largest `capture_all` captured. A decode step beyond it (more sequences than max_batch_size, a
    context past max_seq_len) runs eagerly: correct, inside the plan's activation reserve, and it does not
    stall for a capture. On first use, the `top` graph is captured before any other.
    """

    MAX_BATCH = 256

    def __init__(self, runner: ModelRunner, seg: tuple[str, int, int]) -> None:
        self.runner, (self.dev, self.a, self.b) = runner, seg
        self.device = torch.device(self.dev)
        self.max_len = runner.caches.max_context  # tokens of context the pool addresses
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, Any]]] = {}
        self.pool = None
        # any dtype and head size: the Triton decode kernel where it applies, the SDPA fallback elsewhere;
        # not dynamic NTK rope, whose frequencies change with the length
        self.enabled = all(r.rope_type != "dynamic" for r in runner.rotary.values())
        self.groups = list(runner.caches.groups.values())
        planned = getattr(runner, "graph_sizes", None) or (self.MAX_BATCH, self.max_len)
        self.top = self._top(*planned)  # the largest (batch, context) bucket the pool is planned for

    def _top(self, max_batch: int, max_len: int) -> tuple[int, int]:
        return self.key(min(max_batch, self.MAX_BATCH), min(max_len, self.max_len))

    def fits(self, batch: int, max_len: int) -> bool:
        """Whether a decode step of `batch` sequences and `max_len` tokens of context replays a graph (one
        within `top`)."""
        if not self.enabled or batch > self.MAX_BATCH or max_len > self.max_len:
            return False
        b, ln = self.key(batch, max_len)
        return b <= self.top[0] and ln <= self.top[1]

    def key(self, batch: int, max_len: int) -> tuple[int, int]:
        return _bucket(batch, 1), min(_bucket(max_len, 256), _bucket(self.max_len, 256))

    def capture_all(self, max_batch: int, max_len: int) -> int:
        """Capture every bucket up to `max_batch` sequences and `max_len` tokens of context, largest first;
        that is then `top`. Returns how many were captured."""
        if not self.enabled:
            return 0
        top_b, top_l = self.top = self._top(max_batch, max_len)
        keys = [(b, ln) for b in _powers(1, top_b) for ln in _powers(256, top_l)]
        new = 0
        for key in sorted(keys, reverse=True):  # largest first: the smaller graphs reuse its pool memory
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
                new += 1
        return new

    @staticmethod
    def _layout(Bb: int, Lb: int, n_groups: int) -> list[int]:
        """Offsets in the packed integer input: [pos | per KV group: slots, lens, context slots [Bb, Lb]]."""
        per = 2 * Bb + Bb * Lb
        return [Bb + g * per for g in range(n_groups)]

    def run(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        B = len(step.decode_rows)
        key = self.key(B, step.max_len)  # within `top` (fits)
        if key not in self.graphs:
            if self.top not in self.graphs:  # largest first: the pool peaks at the planned graph's transients
                self.graphs[self.top] = self._capture(*self.top)
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
        graph, io = self.graphs[key]
        Bb, Lb = key
        # all integer inputs go over in one copy; padded rows point at their group's scratch slot, length 1
        # two pinned staging buffers, alternating: with overlap, the previous step's copy may still be queued
        io["turn"] ^= 1
        host = io["host"][io["turn"]]
        host[:Bb] = 0
        host[:B] = step.pos
        for g, off in zip(self.groups, self._layout(Bb, Lb, len(self.groups)), strict=True):
            gi = step.groups[g.window]
            host[off : off + Bb].fill_(g.scratch)
            host[off : off + B] = gi.slots
            host[off + Bb : off + 2 * Bb] = 1
            host[off + Bb : off + Bb + B] = torch.tensor(gi.decode_lens)
            ctx = host[off + 2 * Bb : off + 2 * Bb + Bb * Lb].view(Bb, Lb)
            ctx.fill_(g.scratch)
            ctx[:B, : gi.decode_slots.shape[1]] = gi.decode_slots
        io["packed"].copy_(host, non_blocking=True)
        io["x"][:B].copy_(x, non_blocking=True)
        graph.replay()
        return io["out"][:B]

    def _capture(self, Bb: int, Lb: int) -> tuple[torch.cuda.CUDAGraph, dict[str, Any]]:
        r, d = self.runner, self.device
        H = r.model.config.hidden_size
        offs = self._layout(Bb, Lb, len(self.groups))
        packed = torch.zeros(offs[-1] + 2 * Bb + Bb * Lb, dtype=torch.long, device=d)
        io = {
            "x": torch.zeros((Bb, H), dtype=r.dtype, device=d),
            "packed": packed,
            "host": [torch.zeros(packed.shape, dtype=torch.long).pin_memory() for _ in range(2)],
            "turn": 0,
        }
        pos = packed[:Bb]
        views = []
        for g, off in zip(self.groups, offs, strict=True):
            slots, lens = packed[off : off + Bb], packed[off + Bb : off + 2 * Bb]
            dec_slots = packed[off + 2 * Bb : off + 2 * Bb + Bb * Lb].view(Bb, Lb)
            slots.fill_(g.scratch)
            dec_slots.fill_(g.scratch)
            lens.fill_(1)
            views.append((g.window, slots, lens, dec_slots))
        # the graph reads these at every replay: io keeps them alive (a freed tensor's memory gets reused)
        rows = io["rows"] = torch.arange(Bb, device=d)
        span = io["span"] = torch.arange(Lb, device=d)

        def body() -> torch.Tensor:
            ropes = {k: rot.cos_sin(pos, Lb, r.dtype) for k, rot in r.rotary.items()}
            metas = {}
            for window, slots, lens, dec_slots in views:
                mask = (span[None, :] < lens[:, None])[
                    :, None, None, :
                ]  # [Bb, 1, 1, Lb] for the SDPA fallback
                metas[window] = AttnMeta(slots, rows, dec_slots, mask, [], True, lens.to(torch.int32))
            return run_layers(r.model.layers, io["x"], self.a, self.b, StepContext(ropes, metas, r.caches))

        # one capture stream per GPU for all its graphs: cuBLAS keeps a workspace (32 MiB on Hopper) per
        # stream for the life of the process, inside torch's allocator, and a graph bakes its workspace in.
        # A new stream per graph left one workspace per graph: 768 MiB for the 24 graphs of 8 x 8192, not
        # in the plan (a 4 GiB budget ran out of memory at load). The graphs never run at the same time.
        if self.dev not in r.graph_streams:
            r.graph_streams[self.dev] = torch.cuda.Stream(device=d)
        side = r.graph_streams[self.dev]
        side.wait_stream(torch.cuda.current_stream(d))
        with torch.cuda.stream(side):
            body()  # warm-up: lets cuBLAS/SDPA/Triton pick and allocate their workspaces outside the capture
        torch.cuda.current_stream(d).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:  # the GPU's one pool: its segments' graphs never run at the same time
            if self.dev not in r.graph_pools:
                r.graph_pools[self.dev] = torch.cuda.graph_pool_handle()
            self.pool = r.graph_pools[self.dev]
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            io["out"] = body()
        return graph, io

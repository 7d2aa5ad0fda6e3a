"""Model runner: turns a scheduler step into tensors, runs the stages where the DeviceMap put them, samples.

Hidden states hop between devices at layer boundaries (non-blocking copies; CUDA orders them on the
stream). Each layer's KV cache lives on the layer's device, shaped by its LayerSpec (engine/kv_cache.py).
Per step and device, a `StepContext` holds the rotary tables (one per rope kind) and the attention metadata
(one per KV group: full attention or a sliding window); `run_layers` is the one layer loop every executor
calls (resident segments, CUDA graphs, offload).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spillover.engine.kv_cache import KVCaches
from spillover.engine.sampler import apply_penalties, apply_token_bitmask, sample_rows, top_logprobs
from spillover.engine.scheduler import SchedulerOutput
from spillover.engine.sequence import TokenLogprob
from spillover.layers.attention import AttnMeta, PrefillSlice
from spillover.layers.rotary import Rotary
from spillover.models.base import CausalLM, LayerInput
from spillover.placement.device_map import DeviceMap


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
    images: list[tuple[int, int, int, Any]] = field(
        default_factory=list
    )  # (row, start, q_len, seq) with images

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

    def layer_input(self, i: int) -> LayerInput:
        spec = self.caches.specs[i]
        cos, sin = self.ropes[spec.rope]
        return LayerInput(cos, sin, self.metas[spec.kv.sliding_window], self.caches.k[i], self.caches.v[i])


def run_layers(
    layers: torch.nn.ModuleList, x: torch.Tensor, a: int, b: int, ctx: StepContext
) -> torch.Tensor:
    """The layer loop: layers a..b-1 on the device `ctx` was built for (x: [T, H] there)."""
    for i in range(a, b):
        x = layers[i](x, ctx.layer_input(i))
    return x


class ModelRunner:
    def __init__(
        self, model: CausalLM, device_map: DeviceMap, dtype: torch.dtype, num_blocks: int, block_size: int,
        cuda_graphs: bool = True, rings: int = 0, offload: Any = None, grammars: Any = None,
    ) -> None:  # fmt: skip
        cfg = model.config
        self.model, self.dmap, self.dtype, self.block_size = model, device_map, dtype, block_size
        self.rotary = {k: Rotary(c) for k, c in type(model).rope_configs(cfg).items()}
        specs = type(model).layer_specs(cfg)
        self.caches = KVCaches(specs, device_map.layers, dtype, num_blocks, block_size, rings)
        # one extra block at the end: scratch slots that padded rows of a CUDA-graph batch write to
        self.scratch_slot = num_blocks * block_size
        self.generators: dict[int, torch.Generator] = {}
        self.grammars = grammars  # structured.grammar.Grammars: the bitmasks of constrained rows
        self.head_device = torch.device(device_map.head)
        self.offload = offload  # OffloadExecutor (engine/offload.py) when layers live in CPU memory
        self.segments = layer_segments(device_map)
        streamed = set(getattr(device_map, "streamed", ()) or ())
        self.graphs = {
            seg: DecodeGraphs(self, seg)
            for seg in self.segments
            if cuda_graphs and seg[0].startswith("cuda") and not streamed.intersection(range(seg[1], seg[2]))
        }

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int, max_len: int) -> int:
        """Capture now every decode graph for up to `max_batch` sequences and `max_len` tokens of context,
        instead of on first use (where a server's first request at each new size waits for it). Returns how
        many were captured."""
        return sum(g.capture_all(max_batch, max_len) for g in self.graphs.values())

    @property
    def k_caches(self) -> list[torch.Tensor]:
        return self.caches.k

    @property
    def v_caches(self) -> list[torch.Tensor]:
        return self.caches.v

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self.caches.release(seq_id)

    # ---------------------------------------------------------------- one step

    @property
    def can_overlap(self) -> bool:
        """Whether every stage runs on a GPU, so that a launched step needs no host sync until its result."""
        devs = [self.dmap.embed, self.dmap.head, *self.dmap.layers]
        return self.offload is None and all(str(d).startswith("cuda") for d in devs)

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: StepFuture | None = None) -> StepFuture:
        """Run a step; unless logprobs or penalties need the host, it returns before its tokens reach the host.

        Sequences whose last token is still pending (`seq.pending`) take it from `prev.tokens` on the device.
        """
        step = self._inputs(sched, prev)
        ctxs: dict[str, StepContext] = {}

        def ctx_for(d: str) -> StepContext:
            if d not in ctxs:
                ctxs[d] = self.context(d, step)
            return ctxs[d]

        ids = step.ids.to(self.dmap.embed, non_blocking=True)
        if step.pending:
            dst, src = zip(*step.pending, strict=True)
            src_ids = prev.tokens[torch.tensor(src).to(prev.tokens.device, non_blocking=True)]
            ids[torch.tensor(dst).to(ids.device, non_blocking=True)] = src_ids.to(
                ids.device, non_blocking=True
            )
        x = self.model.embed(ids)  # [T, H]
        if step.images:
            x = self._put_images(x, step)
        for seg in self.segments:
            dev, a, b = seg
            if self.offload is not None and self.offload.owns(a, b):  # CPU-resident layers: engine/offload.py
                x = self.offload.run(self.model.layers, x, a, b, ctx_for)
                continue
            if x.device != torch.device(dev):
                # to the CPU: a blocking copy (the CPU reads the result at once); to a GPU: stream-ordered
                x = x.to(dev, non_blocking=not dev.startswith("cpu"))
            graphs = self.graphs.get(seg)
            if graphs is not None and step.all_decode and graphs.fits(len(step.decode_rows), step.max_len):
                x = graphs.run(x, step)
                continue
            x = run_layers(self.model.layers, x, a, b, ctx_for(dev))
        x = x.to(self.head_device, non_blocking=self.head_device.type != "cpu")
        rows = torch.tensor(step.logit_rows, dtype=torch.long).to(self.head_device, non_blocking=True)
        logits = self.model.head(x.index_select(0, rows)).float()  # [N, V]
        return self._sample(sched, logits)

    def _put_images(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """The vision stage: each image chunk's placeholder rows of `x` [T, H] become the tower's output. A
        prompt's images are encoded once, at its first chunk that holds any, and kept until its last one."""
        for row, start, q_len, seq in step.images:
            mm = seq.mm
            if mm.embeds is None:
                mm.embeds = self.model.encode_images(mm.pixels, mm.grids).to(x.device, x.dtype)  # [P, H]
            sel = (mm.index >= start) & (mm.index < start + q_len)
            rows = (mm.index[sel] - start + row).to(x.device)
            x[rows] = mm.embeds[sel.to(mm.embeds.device)]
            if start + q_len >= mm.end:
                mm.embeds = None
        return x

    def _inputs(self, sched: SchedulerOutput, prev: StepFuture | None = None) -> StepInputs:
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        mrows: list[torch.Tensor | None] = []  # per sequence: [3, q_len] multimodal rope positions
        images: list[tuple[int, int, int, Any]] = []
        dec_rows, logit_rows, pending, spans = [], [], [], []
        row = n_prefill = 0
        for s in sched.scheduled:
            seq = s.seq
            ctx = s.start + s.q_len
            if seq.pending:  # its last token is still on the device (sampled by `prev`)
                if prev is None or seq.seq_id not in prev.rows or ctx != seq.num_tokens:
                    raise RuntimeError(
                        f"sequence {seq.seq_id} has a pending token that no launched step owns"
                    )
                ids.extend(seq.tokens[s.start : ctx - 1] + [0])
                pending.append((row + s.q_len - 1, prev.rows[seq.seq_id]))
            else:
                ids.extend(seq.tokens[s.start : ctx])
            if seq.mm is None:
                pos.append(torch.arange(s.start, ctx))
                mrows.append(None)
            else:  # rope positions of a prompt with images (p + delta after it); rows equal outside images
                m = seq.mm.rope_rows(s.start, ctx, len(seq.prompt_ids))
                pos.append(m[0])
                mrows.append(m)
                if any(a < ctx and s.start < a + n for a, n in seq.mm.spans):
                    images.append((row, s.start, s.q_len, seq))
            decode = s.q_len == 1 and s.start > 0
            if decode:
                dec_rows.append(row)
            else:
                n_prefill += 1
            spans.append((row, s.start, s.q_len, decode, seq))
            if seq.wants_prompt_logprobs():
                logit_rows.extend(range(row, row + s.q_len))
            elif s.samples:
                logit_rows.append(row + s.q_len - 1)
            row += s.q_len
        groups = {w: self._group_inputs(spans, w) for w in self.caches.groups}
        max_len = max(s.start + s.q_len for s in sched.scheduled)
        mpos = None
        if images:
            mpos = torch.cat(
                [p.expand(3, -1) if m is None else m for p, m in zip(pos, mrows, strict=True)], 1
            )
        return StepInputs(torch.tensor(ids, dtype=torch.long), torch.cat(pos), dec_rows, logit_rows, max_len,
                          groups, n_prefill, pending, mpos, images)  # fmt: skip

    def _group_inputs(self, spans: list[tuple], window: int | None) -> GroupInputs:
        """Slot numbers of one KV group: block tables for full attention, per-sequence rings for a window."""
        bs, group = self.block_size, self.caches.groups[window]
        slots: list[torch.Tensor] = []
        dec: list[torch.Tensor] = []
        prefills = []
        for row, start, q_len, decode, seq in spans:
            ctx = start + q_len
            if window is None:
                table = torch.tensor(seq.block_table, dtype=torch.long)

                def where(p: torch.Tensor, table: torch.Tensor = table) -> torch.Tensor:
                    return table[p // bs] * bs + p % bs
            else:
                base, R = self.caches.ring(seq.seq_id) * group.ring, group.ring

                def where(p: torch.Tensor, base: int = base, R: int = R) -> torch.Tensor:
                    return base + p % R

            p = torch.arange(start, ctx)
            s = where(p)
            if window is not None:  # tokens the ring cannot keep (older than its length) go to scratch
                s = torch.where(p >= ctx - group.ring, s, torch.full_like(s, group.scratch))
            slots.append(s)
            lo = 0 if window is None else max(0, ctx - window)
            if decode:
                dec.append(where(torch.arange(lo, ctx)))
            elif window is None:
                if start == 0:  # no past: attend to the fresh K/V causally
                    prefills.append((row, q_len, ctx, None, None, False))
                else:
                    q_pos = torch.arange(start, ctx)[:, None]
                    mask = torch.arange(ctx)[None, :] <= q_pos  # [q_len, ctx]
                    prefills.append((row, q_len, ctx, where(torch.arange(ctx)), mask, False))
            elif start == 0 and q_len <= window:
                prefills.append((row, q_len, ctx, None, None, False))
            else:  # the past still in the window (read before this chunk overwrites it), then the chunk
                past = torch.arange(max(0, start - window + 1), start)
                keys = torch.cat([past, p])[None, :]
                mask = (keys <= p[:, None]) & (keys > p[:, None] - window)  # [q_len, past + q_len]
                prefills.append((row, q_len, keys.shape[1], where(past) if len(past) else None, mask, True))
        dec_slots, lens = None, [len(d) for d in dec]
        if dec:
            L = max(lens)
            dec_slots = torch.stack([torch.cat([d, d[-1:].expand(L - len(d))]) for d in dec])  # [Bd, L]
        return GroupInputs(torch.cat(slots), dec_slots, lens, prefills)

    def context(self, dev: str, step: StepInputs) -> StepContext:
        """The StepContext of device `dev` for `step` (tensors copied there)."""
        d = torch.device(dev)
        positions = (step.pos if step.mpos is None else step.mpos).to(d, non_blocking=True)
        ropes = {k: r.cos_sin(positions, step.max_len, self.dtype) for k, r in self.rotary.items()}
        metas = {w: self._meta(d, step, g) for w, g in step.groups.items()}
        return StepContext(ropes, metas, self.caches)

    def _meta(self, d: torch.device, step: StepInputs, g: GroupInputs) -> AttnMeta:
        dec_rows = dec_slots = dec_mask = dec_lens = None
        if step.decode_rows:
            dec_slots = g.decode_slots.to(d, non_blocking=True)
            dec_rows = torch.tensor(step.decode_rows, dtype=torch.long).to(d, non_blocking=True)
            L = dec_slots.shape[1]
            if d.type == "cuda":
                dec_lens = torch.tensor(g.decode_lens, dtype=torch.int32).to(d, non_blocking=True)
            if min(g.decode_lens) != L:
                lens = torch.tensor(g.decode_lens)
                dec_mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :].to(
                    d, non_blocking=True
                )
        slices = []
        for start, q_len, ctx, ctx_slots, mask, fresh in g.prefills:
            slices.append(
                PrefillSlice(
                    start, q_len, ctx,
                    None if ctx_slots is None else ctx_slots.to(d, non_blocking=True),
                    None if mask is None else mask.to(d, non_blocking=True),
                    fresh,
                )
            )  # fmt: skip
        slots = g.slots.to(d, non_blocking=True)
        return AttnMeta(slots, dec_rows, dec_slots, dec_mask, slices, step.all_decode, dec_lens)

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor) -> StepFuture:
        """Prompt logprobs, then one batched draw for every sequence that samples. The tokens stay on the
        device (a deferred future) unless logprobs or penalties need the host now."""
        results = [SeqResult(s.seq.seq_id) for s in sched.scheduled]
        picks, seqs = [], []  # the logits row of each sampling sequence
        r = 0
        for s, res in zip(sched.scheduled, results, strict=True):
            seq = s.seq
            if seq.wants_prompt_logprobs():
                n = s.q_len
                lp = torch.log_softmax(logits[r : r + n], dim=-1)
                if s.start == 0:
                    res.prompt_logprobs.append(None)
                targets = seq.tokens[s.start + 1 : s.start + n + 1]
                k = min(len(targets), n, len(seq.prompt_ids) - 1 - s.start)
                if k > 0:
                    tgt = torch.tensor(targets[:k], device=lp.device)
                    res.prompt_logprobs.extend(lp[torch.arange(k, device=lp.device), tgt].tolist())
                r += n
            elif s.samples:
                r += 1
            if s.samples:
                picks.append(r - 1)
                seqs.append(seq)
        if not seqs:  # prefill chunks only
            return StepFuture(results, sched)
        rows = logits if len(picks) == logits.shape[0] else logits[picks]  # [N, V]
        adj = rows
        if any(q.params.needs_penalties for q in seqs):
            adj = rows.clone()
            for i, q in enumerate(seqs):
                if q.params.needs_penalties:
                    adj[i] = apply_penalties(rows[i], q.params, q.prompt_ids, q.output_ids)
        constrained = [i for i, q in enumerate(seqs) if q.constraint is not None]
        if constrained:  # grammar masks (structured/grammar.py), computed while the device runs the forward
            adj = adj.clone() if adj is rows else adj
            apply_token_bitmask(adj, self.grammars.fill_bitmask([seqs[i].constraint for i in constrained]),
                                constrained)  # fmt: skip
        toks = sample_rows(adj, [q.params for q in seqs], [self._generator(q, rows.device) for q in seqs])
        rows_of = {q.seq_id: i for i, q in enumerate(seqs)}
        # prompt logprobs live in `results`: a step with any (sampling or not) is read now; a constrained row's
        # grammar must take this token before the next mask: read it now too (no overlap)
        host_now = (
            bool(constrained)
            or any(q.params.logprobs is not None or q.params.needs_penalties for q in seqs)
            or any(s.seq.wants_prompt_logprobs() for s in sched.scheduled)
        )
        if not host_now and toks.device.type == "cuda":
            host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
            host.copy_(toks, non_blocking=True)
            event = torch.cuda.Event()  # recorded on the head's GPU, which need not be the current one
            event.record(torch.cuda.current_stream(toks.device))
            return StepFuture(None, sched, toks, host, event, rows_of)
        if not host_now:
            return StepFuture(None, sched, toks, toks, None, rows_of)
        got = toks.tolist()
        for s, res in zip(sched.scheduled, results, strict=True):
            i = rows_of.get(s.seq.seq_id)
            if i is None:
                continue
            res.token = got[i]
            if s.seq.params.logprobs is not None:
                lp = torch.log_softmax(rows[i], dim=-1)
                res.logprob = TokenLogprob(got[i], float(lp[got[i]]), top_logprobs(lp, s.seq.params.logprobs))
        return StepFuture(results, sched)

    def _generator(self, seq, device: torch.device) -> torch.Generator | None:
        p = seq.params
        if p.seed is None or p.greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = self.generators[seq.seq_id] = torch.Generator(device=device).manual_seed(p.seed)
        return gen


def layer_segments(dmap: DeviceMap) -> list[tuple[str, int, int]]:
    """Contiguous runs of layers on one device: [(device, first, end), ...] in forward order."""
    segs: list[tuple[str, int, int]] = []
    streamed = set(getattr(dmap, "streamed", ()) or ())
    for i, d in enumerate(dmap.layers):
        if segs and segs[-1][0] == d and ((i - 1) in streamed) == (i in streamed):  # streamed: own segments
            segs[-1] = (d, segs[-1][1], i + 1)
        else:
            segs.append((d, i, i + 1))
    return segs


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

    def fits(self, batch: int, max_len: int) -> bool:
        return self.enabled and batch <= self.MAX_BATCH and max_len <= self.max_len

    def key(self, batch: int, max_len: int) -> tuple[int, int]:
        return _bucket(batch, 1), min(_bucket(max_len, 256), _bucket(self.max_len, 256))

    def capture_all(self, max_batch: int, max_len: int) -> int:
        if not self.enabled:
            return 0
        top_b, top_l = self.key(min(max_batch, self.MAX_BATCH), min(max_len, self.max_len))
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
        key = self.key(B, step.max_len)
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

        side = torch.cuda.Stream(device=d)
        side.wait_stream(torch.cuda.current_stream(d))
        with torch.cuda.stream(side):
            body()  # warm-up: lets cuBLAS/SDPA/Triton pick and allocate their workspaces outside the capture
        torch.cuda.current_stream(d).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            io["out"] = body()
        return graph, io

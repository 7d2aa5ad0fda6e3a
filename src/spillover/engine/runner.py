"""Model runner: turns a scheduler step into tensors, runs the stages where the DeviceMap put them, samples.

Hidden states hop between devices at layer boundaries (non-blocking copies; CUDA orders them on the
stream). Each layer's KV cache lives on the layer's device, shaped by its LayerSpec (engine/kv_cache.py).
Per step and device, a `StepContext` (engine/step.py) holds the rotary tables (one per rope kind) and the
attention metadata (one per KV group: full attention or a sliding window); `run_layers` there is the one layer
loop every executor calls. Decode-only steps of a GPU segment replay CUDA graphs (engine/graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spillover.engine.graphs import DecodeGraphs
from spillover.engine.kv_cache import KVCaches
from spillover.engine.sampler import apply_penalties, apply_token_bitmask, sample_rows, top_logprobs
from spillover.engine.scheduler import SchedulerOutput
from spillover.engine.sequence import TokenLogprob
from spillover.engine.step import (
    CrossRows,
    GroupInputs,
    SeqResult,
    StepContext,
    StepFuture,
    StepInputs,
    run_layers,
)
from spillover.layers.attention import AttnMeta, PrefillSlice
from spillover.layers.rotary import Rotary
from spillover.models.base import CausalLM
from spillover.placement.device_map import DeviceMap
from spillover.placement.estimate import HEAD_MIN_ROWS, SAMPLER_MIN_ROWS


class ModelRunner:
    def __init__(
        self, model: CausalLM, device_map: DeviceMap, dtype: torch.dtype, num_blocks: int, block_size: int,
        cuda_graphs: bool = True, rings: int = 0, offload: Any = None, grammars: Any = None,
        head_rows: int = HEAD_MIN_ROWS, sampler_rows: int = SAMPLER_MIN_ROWS,
        graph_sizes: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        """`head_rows`, `sampler_rows`: rows of logits computed, and sampled or scored, at once, at most (the
        plan's estimate.head_rows and estimate.sampler_rows: `_logits`); `graph_sizes`: the
        (max_batch_size, max_seq_len) the plan reserved the decode graphs' pool for (None: no limit but the
        graphs' own)."""
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
        self.head_rows, self.sampler_rows, self.graph_sizes = head_rows, sampler_rows, graph_sizes
        self.offload = offload  # OffloadExecutor (engine/offload.py) when layers live in CPU memory
        # a layer that cannot be captured (mllama's cross-attention) gets its own segment, so that the layers
        # between such layers still decode in CUDA graphs
        eager = frozenset(i for i, layer in enumerate(model.layers) if not getattr(layer, "graph_safe", True))
        self.segments = layer_segments(device_map, eager)
        self.graph_pools: dict[str, Any] = {}  # one CUDA-graph memory pool per GPU, shared by its segments
        self.graph_streams: dict[str, Any] = {}  # one capture stream per GPU (see DecodeGraphs._capture)
        self.cross = bool(getattr(type(model), "cross_attention", False))  # image K/V per sequence (mllama)
        streamed = set(getattr(device_map, "streamed", ()) or ())
        self.graphs = {
            seg: DecodeGraphs(self, seg)
            for seg in self.segments
            if cuda_graphs
            and seg[0].startswith("cuda")
            and not streamed.intersection(range(seg[1], seg[2]))
            and all(getattr(model.layers[i], "graph_safe", True) for i in range(seg[1], seg[2]))
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
        if step.cross:
            self._encode_cross(step)
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
        for _, _, _, seq in step.cross:  # every cross layer has made its K/V of the images: drop the states
            if len(seq.mm.cross_kv) == len(self.model.config.extra["cross_attention_layers"]):
                seq.mm.embeds = None
        x = x.to(self.head_device, non_blocking=self.head_device.type != "cpu")
        rows = torch.tensor(step.logit_rows, dtype=torch.long).to(self.head_device, non_blocking=True)
        return self._sample(sched, x.index_select(0, rows), prev)  # [N, H]: the head runs in _sample

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

    @torch.inference_mode()
    def encode(self, seq: Any) -> None:
        """Encode a new request's images (the vision stage) before it joins a step; ImageError when the
        tower runs out of memory (the request is refused, the steps of the others go on). A preempted
        request's images are encoded again inside its step (`_put_images`, `_encode_cross`)."""
        from spillover.errors import ImageError

        mm = seq.mm
        if mm.embeds is not None:
            return
        try:
            out = self.model.encode_images(mm.pixels, mm.grids)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ImageError(
                f"encoding {len(mm.pixels)} image(s) ran out of GPU memory; send fewer or smaller images, or "
                "plan for them with --max-num-images / --max-image-length"
            ) from None
        if not self.cross:  # the tower's rows go into the embeddings: keep them there, in the model dtype
            out = out.to(self.dmap.embed, self.dtype)
        mm.embeds = out

    def _encode_cross(self, step: StepInputs) -> None:
        """Cross-attention models: a sequence's images are encoded once, before its cross layers first need
        them (each layer then keeps its K/V of them in `mm.cross_kv`)."""
        n = len(self.model.config.extra["cross_attention_layers"])
        for _, _, _, seq in step.cross:
            mm = seq.mm
            if mm.embeds is None and len(mm.cross_kv) < n:
                mm.embeds = self.model.encode_images(mm.pixels, mm.grids)

    def _inputs(self, sched: SchedulerOutput, prev: StepFuture | None = None) -> StepInputs:
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        mrows: list[torch.Tensor | None] = []  # per sequence: [3, q_len] multimodal rope positions
        images: list[tuple[int, int, int, Any]] = []
        cross: list[tuple[int, int, int, Any]] = []
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
            if seq.mm is None or self.cross:
                pos.append(torch.arange(s.start, ctx))
                mrows.append(None)
                if seq.mm is not None:
                    cross.append((row, s.start, s.q_len, seq))
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
                          groups, n_prefill, pending, mpos, images, cross)  # fmt: skip

    def _group_inputs(self, spans: list[tuple], window: int | None) -> GroupInputs:
        """Slot numbers of one KV group: block tables for full attention, per-sequence rings for a window.
        Built in numpy: torch runs host ops of 32k+ elements on its OpenMP threads (32 rows x 4096 context:
        3.4 ms a step on a 2-core CPU, 205 ms once under load; numpy 1.4 ms: benchmarks/host_step.py)."""
        bs, group = self.block_size, self.caches.groups[window]
        slots: list[np.ndarray] = []
        dec: list[np.ndarray] = []
        prefills = []
        t = torch.from_numpy
        for row, start, q_len, decode, seq in spans:
            ctx = start + q_len
            if window is None:
                table = np.asarray(seq.block_table, dtype=np.int64)

                def where(p: np.ndarray, table: np.ndarray = table) -> np.ndarray:
                    return table[p // bs] * bs + p % bs
            else:
                base, R = self.caches.ring(seq.seq_id) * group.ring, group.ring

                def where(p: np.ndarray, base: int = base, R: int = R) -> np.ndarray:
                    return base + p % R

            p = np.arange(start, ctx, dtype=np.int64)
            s = where(p)
            if window is not None:  # tokens the ring cannot keep (older than its length) go to scratch
                s = np.where(p >= ctx - group.ring, s, group.scratch)
            slots.append(s)
            lo = 0 if window is None else max(0, ctx - window)
            if decode:
                dec.append(where(np.arange(lo, ctx, dtype=np.int64)))
            elif window is None:
                if start == 0:  # no past: attend to the fresh K/V causally
                    prefills.append((row, q_len, ctx, None, None, False))
                else:  # a past: causal to the bottom right (layers/attention.py builds a mask only where needed)
                    prefills.append((row, q_len, ctx, t(where(np.arange(ctx, dtype=np.int64))), None, False))
            elif start == 0 and q_len <= window:
                prefills.append((row, q_len, ctx, None, None, False))
            else:  # the past still in the window (read before this chunk overwrites it), then the chunk
                past = np.arange(max(0, start - window + 1), start, dtype=np.int64)
                keys = np.concatenate([past, p])[None, :]
                mask = (keys <= p[:, None]) & (keys > p[:, None] - window)  # [q_len, past + q_len]
                prefills.append(
                    (row, q_len, keys.shape[1], t(where(past)) if len(past) else None, t(mask), True)
                )
        dec_slots, lens = None, [len(d) for d in dec]
        if dec:
            L = max(lens)
            padded = np.empty((len(dec), L), dtype=np.int64)  # [Bd, L], each row padded with its last slot
            for r, d in enumerate(dec):
                padded[r, : len(d)] = d
                padded[r, len(d) :] = d[-1]
            dec_slots = t(padded)
        return GroupInputs(t(np.concatenate(slots)), dec_slots, lens, prefills)

    def context(self, dev: str, step: StepInputs) -> StepContext:
        """The StepContext of device `dev` for `step` (tensors copied there)."""
        d = torch.device(dev)
        positions = (step.pos if step.mpos is None else step.mpos).to(d, non_blocking=True)
        ropes = {k: r.cos_sin(positions, step.max_len, self.dtype) for k, r in self.rotary.items()}
        metas = {w: self._meta(d, step, g) for w, g in step.groups.items()}
        cross = None
        if step.cross:  # per sequence: the vision tokens each of its rows attends to (models/mllama.py)
            rows_of, cfg, cross = type(self.model).cross_rows, self.model.config, []
            for row, start, q_len, seq in step.cross:
                allowed, keep = rows_of(cfg, seq.mm, start, q_len, len(seq.prompt_ids))
                cross.append(CrossRows(row, q_len, seq.mm, allowed.to(d), keep.to(d, self.dtype)))
        # the last layer's rows that no logit reads need no MLP (a prompt's: all but its last; llama.cpp skips
        # them too); layers that read LayerInput.out_rows compute only those rows (quant/gguf_native.py)
        out_rows = None
        if len(step.logit_rows) < len(step.ids):
            out_rows = torch.tensor(step.logit_rows, dtype=torch.long).to(d, non_blocking=True)
        return StepContext(ropes, metas, self.caches, cross, out_rows, len(self.model.layers) - 1)

    def _meta(self, d: torch.device, step: StepInputs, g: GroupInputs) -> AttnMeta:
        dec_rows = dec_slots = dec_mask = dec_lens = None
        if step.decode_rows:
            dec_slots = g.decode_slots.to(d, non_blocking=True)
            dec_rows = torch.tensor(step.decode_rows, dtype=torch.long).to(d, non_blocking=True)
            L = dec_slots.shape[1]
            dec_lens = torch.tensor(g.decode_lens, dtype=torch.int32).to(d, non_blocking=True)
            if min(g.decode_lens) != L:  # numpy: see _group_inputs
                mask = np.arange(L)[None, :] < np.asarray(g.decode_lens)[:, None]  # [Bd, L]
                dec_mask = torch.from_numpy(mask)[:, None, None, :].to(d, non_blocking=True)
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

    def _logits(
        self, hidden: torch.Tensor, take: Callable[[int, torch.Tensor], None], argmax_only: bool = False
    ) -> None:
        """`take(first row, logits [<= sampler_rows, V])` over the fp32 logits of `hidden` [N, H], in order.
        The head runs on `head_rows` rows at a time (each run reads the whole lm_head, so not fewer), what
        is done with its logits (sampling, logprobs) on `sampler_rows` at a time: the plan reserves the
        head's transients for exactly that (estimate.head_activation_bytes), whatever the step holds (every
        running sequence's decode, a prefill chunk's prompt logprobs). `argmax_only`: greedy draws and
        nothing else, which add no transients: whole head slices. `take` keeps no slice: each is freed
        before the next is computed. N <= both (the common case): one slice, the head of `hidden` itself."""
        N, R = hidden.shape[0], self.head_rows
        S = R if argmax_only else self.sampler_rows
        for a in range(0, N, R):
            logits = self.model.head(hidden if N <= R else hidden[a : a + R]).float()  # [<= R, V]
            n = logits.shape[0]
            for c in range(0, n, S):
                take(a + c, logits if n <= S else logits[c : c + S])
            del logits

    def _sample(
        self, sched: SchedulerOutput, hidden: torch.Tensor, prev: StepFuture | None = None
    ) -> StepFuture:
        """Logits of `hidden` [N, H] (the rows that read any) one slice at a time (`_logits`); each slice's
        prompt logprobs, then one batched draw for its sampling sequences, before the next slice. Every row
        is treated alone and each seeded sequence draws from its own generator, so the slices change no
        result. The tokens stay on the device (a deferred future) unless logprobs or penalties need the host
        now. A constrained sequence whose last token is in `prev` (still in flight) has its grammar take it
        here, after this step's forward is launched, so the masks are computed while the device runs."""
        results = [SeqResult(s.seq.seq_id) for s in sched.scheduled]
        scored = []  # (first logits row, target tokens, result) of each chunk that wants prompt logprobs
        picks, seqs = [], []  # the logits row of each sampling sequence
        r = 0
        for s, res in zip(sched.scheduled, results, strict=True):
            seq = s.seq
            if seq.wants_prompt_logprobs():
                n = s.q_len
                if s.start == 0:
                    res.prompt_logprobs.append(None)
                targets = seq.tokens[s.start + 1 : s.start + n + 1]
                k = min(len(targets), n, len(seq.prompt_ids) - 1 - s.start)
                if k > 0:
                    scored.append((r, targets[:k], res))
                r += n
            elif s.samples:
                r += 1
            if s.samples:
                picks.append(r - 1)
                seqs.append(seq)
        # prompt logprobs live in `results`: a step with any (sampling or not) is read now
        host_now = any(q.params.logprobs is not None or q.params.needs_penalties for q in seqs) or any(
            s.seq.wants_prompt_logprobs() for s in sched.scheduled
        )
        constrained = [i for i, q in enumerate(seqs) if q.constraint is not None]
        masks: list[torch.Tensor] = []  # the grammar bitmasks of every constrained row, at the first need
        parts, got, lps = [], [], {}
        nxt = [0]  # the next sampling sequence

        def take(a: int, logits: torch.Tensor) -> None:  # one slice: rows a .. a + len(logits)
            b = a + logits.shape[0]
            for first, targets, res in scored:  # prompt logprobs of this slice's rows
                lo, hi = max(first, a), min(first + len(targets), b)
                if lo < hi:
                    lp = torch.log_softmax(logits[lo - a : hi - a], dim=-1)
                    tgt = torch.tensor(targets[lo - first : hi - first], device=lp.device)
                    res.prompt_logprobs.extend(lp[torch.arange(hi - lo, device=lp.device), tgt].tolist())
            j0 = j = nxt[0]
            while j < len(picks) and picks[j] < b:
                j += 1
            if j == j0:
                return
            nxt[0] = j
            here, part = [p - a for p in picks[j0:j]], seqs[j0:j]
            rows = logits if len(here) == logits.shape[0] else logits[here]  # [n, V]
            adj = rows
            if any(q.params.needs_penalties for q in part):
                adj = rows.clone()
                for i, q in enumerate(part):
                    if q.params.needs_penalties:
                        adj[i] = apply_penalties(rows[i], q.params, q.prompt_ids, q.output_ids)
            cons = [i - j0 for i in constrained if j0 <= i < j]
            if cons:  # grammar masks (structured/grammar.py)
                if not masks:
                    masks.append(self._masks([seqs[i] for i in constrained], prev, adj.is_cuda))
                c0 = constrained.index(j0 + cons[0])
                adj = adj.clone() if adj is rows else adj
                apply_token_bitmask(adj, masks[0][c0 : c0 + len(cons)], cons)
            toks = sample_rows(adj, [q.params for q in part], [self._generator(q, rows.device) for q in part])
            parts.append(toks)
            if host_now:
                got.extend(toks.tolist())
                for i, q in enumerate(part):
                    if q.params.logprobs is not None:
                        lp = torch.log_softmax(rows[i], dim=-1)
                        t = got[j0 + i]
                        lps[j0 + i] = TokenLogprob(t, float(lp[t]), top_logprobs(lp, q.params.logprobs))

        plain = all(
            q.params.greedy
            and not q.params.needs_penalties
            and q.params.logprobs is None
            and q.constraint is None
            for q in seqs
        )
        self._logits(hidden, take, argmax_only=plain and not scored)
        if not seqs:  # prefill chunks only
            return StepFuture(results, sched)
        toks = parts[0] if len(parts) == 1 else torch.cat(parts)
        rows_of = {q.seq_id: i for i, q in enumerate(seqs)}
        if not host_now and toks.device.type == "cuda":
            host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
            host.copy_(toks, non_blocking=True)
            event = torch.cuda.Event()  # recorded on the head's GPU, which need not be the current one
            event.record(torch.cuda.current_stream(toks.device))
            return StepFuture(None, sched, toks, host, event, rows_of)
        if not host_now:
            return StepFuture(None, sched, toks, toks, None, rows_of)
        for s, res in zip(sched.scheduled, results, strict=True):
            i = rows_of.get(s.seq.seq_id)
            if i is None:
                continue
            res.token = got[i]
            res.logprob = lps.get(i)
        return StepFuture(results, sched)

    def _masks(self, seqs: list[Any], prev: StepFuture | None, pin: bool) -> torch.Tensor:
        """The grammar bitmasks of constrained `seqs` (one row each). Those whose last token is still in
        flight in `prev` take it first: that waits for the previous step only (this step's forward is
        queued behind it)."""
        early = [q for q in seqs if q.pending and prev is not None]
        if early:
            got = {r.seq_id: r.token for r in prev.result()}
            for q in early:
                q.constraint.take_early(got[q.seq_id], got[q.seq_id] in q.eos_ids)
        return self.grammars.fill_bitmask([q.constraint for q in seqs], pin)

    def _generator(self, seq, device: torch.device) -> torch.Generator | None:
        p = seq.params
        if p.seed is None or p.greedy:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = self.generators[seq.seq_id] = torch.Generator(device=device).manual_seed(p.seed)
        return gen


def layer_segments(dmap: DeviceMap, alone: frozenset[int] = frozenset()) -> list[tuple[str, int, int]]:
    """Contiguous runs of layers on one device: [(device, first, end), ...] in forward order. Streamed layers
    form their own runs; so does each GPU layer in `alone` (one that runs outside CUDA graphs)."""
    segs: list[tuple[str, int, int]] = []
    streamed = set(getattr(dmap, "streamed", ()) or ())
    for i, d in enumerate(dmap.layers):
        apart = d.startswith("cuda") and (i in alone or i - 1 in alone)
        if segs and segs[-1][0] == d and ((i - 1) in streamed) == (i in streamed) and not apart:
            segs[-1] = (d, segs[-1][1], i + 1)
        else:
            segs.append((d, i, i + 1))
    return segs

"""Model runner: turns a scheduler step into tensors, runs the layers where the DeviceMap put them, samples.

Hidden states hop between devices at layer boundaries (non-blocking copies; CUDA orders them on the
stream). Each layer's KV cache lives on the layer's device. Attention metadata and rotary tables are
built once per step for each device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spillover.engine.scheduler import SchedulerOutput
from spillover.engine.sequence import TokenLogprob
from spillover.layers.attention import AttnMeta, PrefillSlice
from spillover.layers.rotary import Rotary
from spillover.layers.sampler import apply_penalties, sample_one, top_logprobs
from spillover.models.llama import LayerInput
from spillover.placement.device_map import DeviceMap


@dataclass
class SeqResult:
    seq_id: int
    token: int | None = None  # sampled token (None: prefill chunk that does not reach the end)
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[float | None] = field(default_factory=list)  # appended to the sequence's list


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, device_map: DeviceMap, dtype: torch.dtype, num_blocks: int, block_size: int
    ) -> None:
        cfg = model.config
        self.model, self.dmap, self.dtype, self.block_size = model, device_map, dtype, block_size
        self.rotary = Rotary(cfg)
        slots = num_blocks * block_size
        shape = (slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=d) for d in device_map.layers]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=d) for d in device_map.layers]
        self.generators: dict[int, torch.Generator] = {}
        self.head_device = torch.device(device_map.head)

    def kv_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d, k, v in zip(self.dmap.layers, self.k_caches, self.v_caches, strict=True):
            out[d] = out.get(d, 0) + k.nbytes + v.nbytes
        return out

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    # ---------------------------------------------------------------- one step

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[SeqResult]:
        ids, pos, slots = [], [], []
        decode_rows, decode_slots, decode_lens = [], [], []
        prefills: list[tuple[int, int, int, list[int]]] = []  # start, q_len, ctx_len, slots of the context
        logit_rows: list[int] = []
        row = 0
        for s in sched.scheduled:
            seq, tokens, bs = s.seq, s.seq.tokens, self.block_size
            table = seq.block_table
            ctx = s.start + s.q_len
            ids.extend(tokens[s.start : ctx])
            pos.extend(range(s.start, ctx))
            slots.extend(table[p // bs] * bs + p % bs for p in range(s.start, ctx))
            ctx_slots = [table[p // bs] * bs + p % bs for p in range(ctx)]
            if s.q_len == 1 and s.start > 0:
                decode_rows.append(row)
                decode_slots.append(ctx_slots)
                decode_lens.append(ctx)
            else:
                prefills.append((row, s.q_len, ctx, ctx_slots))
            if seq.wants_prompt_logprobs():
                logit_rows.extend(range(row, row + s.q_len))
            elif s.samples:
                logit_rows.append(row + s.q_len - 1)
            row += s.q_len

        host = {
            "ids": torch.tensor(ids, dtype=torch.long),
            "pos": torch.tensor(pos, dtype=torch.long),
            "slots": torch.tensor(slots, dtype=torch.long),
        }
        max_len = max(s.start + s.q_len for s in sched.scheduled)
        metas = {d: self._meta(d, host, decode_rows, decode_slots, decode_lens, prefills, max_len) for d in self.dmap.devices()}

        x = self.model.embed(host["ids"].to(self.dmap.embed, non_blocking=True))  # [T, H]
        for i, layer in enumerate(self.model.layers):
            dev = self.dmap.layers[i]
            if x.device != torch.device(dev):
                x = x.to(dev, non_blocking=True)
            cos, sin, meta = metas[dev]
            x = layer(x, LayerInput(cos, sin, meta, self.k_caches[i], self.v_caches[i]))
        x = x.to(self.head_device, non_blocking=True)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.head_device)
        logits = self.model.head(x.index_select(0, rows)).float()  # [N, V]
        return self._sample(sched, logits)

    def _meta(self, dev, host, decode_rows, decode_slots, decode_lens, prefills, max_len):
        d = torch.device(dev)
        pos = host["pos"].to(d, non_blocking=True)
        cos, sin = self.rotary.cos_sin(pos, max_len, self.dtype)
        dec_rows = dec_slots = dec_mask = None
        if decode_rows:
            L = max(decode_lens)
            padded = [s + [s[-1]] * (L - len(s)) for s in decode_slots]
            dec_slots = torch.tensor(padded, dtype=torch.long).to(d, non_blocking=True)
            dec_rows = torch.tensor(decode_rows, dtype=torch.long).to(d, non_blocking=True)
            if min(decode_lens) != L:
                lens = torch.tensor(decode_lens)
                dec_mask = (torch.arange(L)[None, :] < lens[:, None])[:, None, None, :].to(d, non_blocking=True)
        slices = []
        for start, q_len, ctx, ctx_slots in prefills:
            if ctx == q_len:  # no past: attend to the fresh K/V causally
                slices.append(PrefillSlice(start, q_len, ctx, None, None))
                continue
            past = ctx - q_len
            q_pos = torch.arange(past, ctx)[:, None]
            mask = (torch.arange(ctx)[None, :] <= q_pos).to(d, non_blocking=True)  # [q_len, ctx]
            slots_t = torch.tensor(ctx_slots, dtype=torch.long).to(d, non_blocking=True)
            slices.append(PrefillSlice(start, q_len, ctx, slots_t, mask))
        contiguous = bool(decode_rows) and not prefills and decode_rows == list(range(len(decode_rows)))
        meta = AttnMeta(host["slots"].to(d, non_blocking=True), dec_rows, dec_slots, dec_mask, slices, contiguous)
        return cos, sin, meta

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor) -> list[SeqResult]:
        results: list[SeqResult] = []
        r = 0
        simple = all(
            s.seq.params.greedy
            and not s.seq.params.needs_penalties
            and s.seq.params.logprobs is None
            and not s.seq.wants_prompt_logprobs()
            for s in sched.scheduled
        )
        if simple:  # one argmax and one host sync for the whole batch
            toks = logits.argmax(-1).tolist() if logits.shape[0] else []
            for s in sched.scheduled:
                res = SeqResult(s.seq.seq_id)
                if s.samples:
                    res.token, r = toks[r], r + 1
                results.append(res)
            return results
        for s in sched.scheduled:
            seq, p = s.seq, s.seq.params
            res = SeqResult(seq.seq_id)
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
                row_logits = logits[r - 1]
            elif s.samples:
                row_logits, r = logits[r], r + 1
            if s.samples:
                res.token, res.logprob = self._sample_row(seq, row_logits)
            results.append(res)
        return results

    def _sample_row(self, seq, row: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        p = seq.params
        adj = apply_penalties(row, p, seq.prompt_ids, seq.output_ids) if p.needs_penalties else row
        gen = None
        if p.seed is not None and not p.greedy:
            gen = self.generators.get(seq.seq_id)
            if gen is None:
                gen = torch.Generator(device=row.device).manual_seed(p.seed)
                self.generators[seq.seq_id] = gen
        tok = sample_one(adj, p, gen)
        if p.logprobs is None:
            return tok, None
        lp = torch.log_softmax(row, dim=-1)
        return tok, TokenLogprob(tok, float(lp[tok]), top_logprobs(lp, p.logprobs))

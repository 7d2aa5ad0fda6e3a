"""Continuous-batching scheduler: which sequences run this step, and how many tokens of each. No tensors.

Each step has a token budget (`max_batched_tokens`). Running sequences that decode come first (one token
each); then prefill chunks fill the rest of the budget, so a long prompt is prefilled over several steps
while others keep decoding. When the KV cache has no block left for a decode, the newest running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later
(its prompt plus what it has generated so far). No request is dropped.

Prefix sharing: a sequence admitted with nothing computed takes the registered full blocks its tokens start
with (see kv/block_manager.py) and starts computing after them. At least its last token is always
computed, so there are logits to sample from; sequences that want prompt logprobs take nothing (their
logprobs come from computing the whole prompt). Completed full blocks are registered after every step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from spillover.engine.sequence import Sequence, Status
from spillover.kv.block_manager import BlockManager


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first token position computed this step
    q_len: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.start + self.q_len == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.q_len for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batched_tokens: int, max_num_seqs: int = 256) -> None:
        self.blocks = blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        need = -(-(seq.num_tokens + 1) // self.blocks.block_size)  # the prompt and its first new token
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"a prompt of {seq.num_tokens} tokens needs {need} KV blocks but the cache has "
                f"{self.blocks.num_blocks}; raise --max-seq-len (or the KV cache size)"
            )
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_hashes.clear()

    def schedule(self) -> SchedulerOutput:
        budget = self.max_batched_tokens
        out: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        # 1. running sequences: decodes (and unfinished prefill chunks) in arrival order
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            q_len = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_grow(seq.block_table, seq.num_computed + q_len):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # preempted itself: nothing left to schedule after it
            self.blocks.grow(seq.block_table, seq.num_computed + q_len)
            out.append(ScheduledSeq(seq, seq.num_computed, q_len))
            budget -= q_len
            i += 1
        # 2. waiting sequences: start prefill while budget, blocks and seq slots remain
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            self.waiting.popleft()
            q_len = min(seq.num_tokens - seq.num_computed, budget)
            self.blocks.grow(seq.block_table, seq.num_computed + q_len)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, seq.num_computed, q_len))
            budget -= q_len
        return SchedulerOutput(out, preempted)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Whether the first chunk of waiting `seq` fits; if so, give it its cached prefix blocks."""
        hit: list[int] = []
        if seq.num_computed == 0 and not seq.block_table and not seq.wants_prompt_logprobs():
            hit = self.blocks.match_prefix(seq.cache_tokens, (seq.num_tokens - 1) // self.blocks.block_size)
        done = len(hit) * self.blocks.block_size if hit else seq.num_computed
        q_len = min(seq.num_tokens - done, budget)
        table_len = len(hit) if hit else len(seq.block_table)
        need = max(0, -(-(done + q_len) // self.blocks.block_size) - table_len) + self.blocks.revived(hit)
        # keep one spare block per running sequence so decodes are not preempted at once
        if need > self.blocks.num_free - len(self.running):
            return False
        if hit:
            self.blocks.share(seq.block_table, seq.block_hashes, hit)
            seq.num_computed = done
        seq.num_cached_prompt = min(done, len(seq.prompt_ids)) if hit else 0
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        if len(seq.prompt_logprobs) < len(seq.prompt_ids):
            seq.prompt_logprobs.clear()  # collected again from the start when it is recomputed
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def advance(self, sched: SchedulerOutput) -> None:
        """Record that the scheduled tokens' K/V are now in the cache."""
        for s in sched.scheduled:
            seq = s.seq
            if seq.is_finished:  # ended (stop token, abort) while this step ran: its blocks are gone
                continue
            seq.num_computed = s.start + s.q_len
            if seq.num_computed // self.blocks.block_size > len(seq.block_hashes):
                self.blocks.register(seq.block_table, seq.cache_tokens, seq.block_hashes, seq.num_computed)

"""Continuous-batching scheduler: which sequences run this step, and how many tokens of each. No tensors.

Each step has a token budget (`max_batched_tokens`). Running sequences that decode come first (one token
each); then prefill chunks fill the rest of the budget, so a long prompt is prefilled over several steps
while others keep decoding. When the KV cache has no block left for a decode, the newest running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later
(its prompt plus what it has generated so far). No request is dropped.
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
        need = -(-seq.num_tokens // self.blocks.block_size) + 1
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
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED

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
            q_len = min(seq.num_tokens - seq.num_computed, budget)
            # keep one spare block per running sequence so decodes are not preempted at once
            if self.blocks.blocks_needed(seq.block_table, seq.num_computed + q_len) > self.blocks.num_free - len(
                self.running
            ):
                break
            self.waiting.popleft()
            self.blocks.grow(seq.block_table, seq.num_computed + q_len)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, seq.num_computed, q_len))
            budget -= q_len
        return SchedulerOutput(out, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.num_preemptions += 1
        if len(seq.prompt_logprobs) < len(seq.prompt_ids):
            seq.prompt_logprobs.clear()  # collected again from the start when it is recomputed
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def advance(self, sched: SchedulerOutput) -> None:
        """Record that the scheduled tokens' K/V are now in the cache."""
        for s in sched.scheduled:
            s.seq.num_computed = s.start + s.q_len

"""Request state. No tensors."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from spillover.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: frozenset[int] = frozenset()
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    pending: int = 0  # sampled tokens still on the device (0 or 1): counted by num_tokens, not in output_ids
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-chain hashes of the table's full blocks
    num_cached_prompt: int = 0  # prompt tokens taken from the prefix cache at the last admission
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: Any = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    num_preemptions: int = 0
    arrival: float = 0.0
    first_token_time: float | None = None
    constraint: Any = None  # structured.grammar.Constraint: the grammar state of a constrained request
    mm: Any = None  # multimodal.MMInput: the prompt's images (None: text only)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cache_tokens(self) -> list[int]:
        """What the prefix cache keys on: the tokens, image placeholders replaced by keys of their pixels."""
        return self.tokens if self.mm is None else self.mm.keyed(self.tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are collected on the first pass over the prompt (not after a preemption)."""
        return self.params.prompt_logprobs and len(self.prompt_logprobs) < len(self.prompt_ids)

"""Sampling parameters of one request (the SDK's `SamplingParams`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spillover.errors import ConfigError


@dataclass
class SamplingParams:
    max_tokens: int | None = 256  # None: until EOS or the context is full
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # OpenAI-style, on generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: plus the top k
    prompt_logprobs: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output (at most one; see structured/grammar.py): the answer is forced to match it
    json_schema: dict[str, Any] | str | None = None  # a JSON schema (dict or its JSON text); {} = any JSON
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect, which also takes %json {schema})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ConfigError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        self._check_constraint()

    def _check_constraint(self) -> None:
        set_ = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(set_) > 1:
            raise ConfigError(
                f"give at most one of json_schema, regex, choice, grammar; got {', '.join(set_)}"
            )
        if self.choice is not None:
            if (
                isinstance(self.choice, str)
                or not self.choice
                or not all(isinstance(c, str) for c in self.choice)
            ):
                raise ConfigError("choice takes a non-empty list of strings")
            self.choice = list(self.choice)
        for n in ("regex", "grammar"):
            if getattr(self, n) is not None and not isinstance(getattr(self, n), str):
                raise ConfigError(f"{n} must be a string")

    @property
    def constrained(self) -> bool:
        return any(getattr(self, n) is not None for n in ("json_schema", "regex", "choice", "grammar"))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

"""Per-request output processing: incremental detokenization, stop strings, results. No tensors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from spillover.engine.sequence import Sequence, TokenLogprob


@dataclass
class RequestOutput:
    """The result of one request (or, when streaming, one chunk of it: text and ids are deltas then)."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Any = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[float | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestState:
    """Text-side state of one sequence: accumulated text, stop-string search, what was streamed already."""

    def __init__(self, seq: Sequence, tokenizer: Any | None) -> None:
        self.seq = seq
        p = seq.params
        self.detok = tokenizer.stream_decoder(p.skip_special_tokens) if tokenizer else None
        self.text = ""
        self.sent_text = 0  # characters already streamed
        self.sent_tokens = 0
        self.sent_logprobs = 0
        self.hold = max((len(s) for s in p.stop), default=1) - 1  # chars that may still become a stop string

    def on_token(self, token: int) -> None:
        """Update text after `token` was appended to the sequence; finishes it on a stop string."""
        if self.detok is None:
            return
        prev = len(self.text)
        self.text += self.detok.push(token)
        if not self.seq.params.stop or len(self.text) == prev:
            return
        start = max(0, prev - self.hold)
        for s in self.seq.params.stop:
            i = self.text.find(s, start)
            if i >= 0:
                end = i + len(s) if self.seq.params.include_stop_str_in_output else i
                self.text = self.text[:end]
                self.seq.finish_reason, self.seq.stop_reason = "stop", s
                return

    def flush(self) -> None:
        """When the sequence ends: release text the detokenizer held back (an unfinished character)."""
        if self.detok is not None and not isinstance(self.seq.stop_reason, str):
            self.text += self.detok.flush()

    def delta(self) -> RequestOutput:
        """What is new since the last call (text held back while it may still turn into a stop string)."""
        seq = self.seq
        done = seq.finish_reason is not None
        end = len(self.text) if done else max(self.sent_text, len(self.text) - self.hold)
        out = RequestOutput(
            seq.request_id,
            self.text[self.sent_text : end],
            seq.output_ids[self.sent_tokens :],
            seq.prompt_ids,
            seq.finish_reason if done else None,
            seq.stop_reason,
            seq.logprobs[self.sent_logprobs :] if seq.params.logprobs is not None else None,
            seq.prompt_logprobs if (seq.params.prompt_logprobs and self.sent_tokens == 0) else None,
        )
        self.sent_text, self.sent_tokens, self.sent_logprobs = end, len(seq.output_ids), len(seq.logprobs)
        return out

    def final(self) -> RequestOutput:
        seq = self.seq
        return RequestOutput(
            seq.request_id, self.text, list(seq.output_ids), seq.prompt_ids, seq.finish_reason, seq.stop_reason,
            list(seq.logprobs) if seq.params.logprobs is not None else None,
            list(seq.prompt_logprobs) if seq.params.prompt_logprobs else None,
        )  # fmt: skip


def sequence_metrics(seq: Sequence) -> dict[str, float]:
    """Token counts, time to first token and prompt/decode rates of a sequence so far."""
    now = time.perf_counter()
    ttft = (seq.first_token_time or now) - seq.arrival
    n = len(seq.output_ids)
    decode_s = now - (seq.first_token_time or now)
    return {
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": n,
        "time_to_first_token_s": ttft,
        "prompt_tok_per_s": len(seq.prompt_ids) / ttft if ttft > 0 else 0.0,
        "decode_tok_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
    }

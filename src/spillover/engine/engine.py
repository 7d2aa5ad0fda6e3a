"""The engine loop: schedule -> run -> update, a few lines; plus request bookkeeping."""

from __future__ import annotations

import itertools
import time
from typing import Any

from spillover.engine.output import RequestState
from spillover.engine.runner import ModelRunner, SeqResult
from spillover.engine.sampling import SamplingParams
from spillover.engine.scheduler import Scheduler
from spillover.engine.sequence import Sequence
from spillover.errors import PromptTooLongError


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Any | None,
        eos_ids: set[int],
        max_model_len: int,
    ) -> None:
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count()

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestState:
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {self.max_model_len}; "
                "shorten the prompt"
            )
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(list(prompt_ids), params, self.eos_ids, rid, arrival=time.perf_counter())
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            raise PromptTooLongError(str(e)) from None
        state = RequestState(seq, self.tokenizer)
        self.requests[rid] = state
        return state

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None and not state.seq.is_finished:
            self.scheduler.abort(state.seq)
            self.runner.forget(state.seq.seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestState]:
        """Run one step; return the requests that produced something (new tokens or finished)."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        results = self.runner.execute(sched)
        self.scheduler.advance(sched)
        changed = []
        for s, r in zip(sched.scheduled, results, strict=True):
            s.seq.prompt_logprobs.extend(r.prompt_logprobs)
            if r.token is not None:
                changed.append(self._apply(s.seq, r))
        return changed

    def _apply(self, seq: Sequence, r: SeqResult) -> RequestState:
        state = self.requests[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.output_ids.append(r.token)
        if r.logprob is not None:
            seq.logprobs.append(r.logprob)
        p = seq.params
        if not p.ignore_eos and r.token in seq.eos_ids:
            seq.finish_reason, seq.stop_reason = "stop", r.token
        elif r.token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", r.token
        else:
            state.on_token(r.token)
        if seq.finish_reason is None:
            if p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            state.flush()
            self.scheduler.finish(seq)
            self.runner.forget(seq.seq_id)
        return state

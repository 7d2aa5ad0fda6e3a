"""The engine loop: schedule -> run -> update, a few lines; plus request bookkeeping."""

from __future__ import annotations

import itertools
import time
from typing import Any

from spillover.engine.output import RequestState
from spillover.engine.runner import ModelRunner
from spillover.engine.sampling import SamplingParams
from spillover.engine.scheduler import ScheduledSeq, Scheduler
from spillover.engine.sequence import Sequence
from spillover.engine.step import SeqResult, StepFuture
from spillover.errors import ConfigError, PromptTooLongError
from spillover.structured.grammar import Grammars


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Any | None,
        eos_ids: set[int],
        max_model_len: int,
        overlap: bool | None = None,
    ) -> None:
        self.runner, self.scheduler, self.tokenizer = runner, scheduler, tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}
        self._ids = itertools.count()
        # overlap: launch step N+1 before reading step N's tokens (None: when every stage runs on a GPU)
        self.overlap = runner.can_overlap if overlap is None else overlap
        self.in_flight: StepFuture | None = None
        # constrained decoding (structured/): the engine compiles constraints, the runner fills their masks
        self.grammars: Grammars | None = runner.grammars

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, mm: Any = None
    ) -> RequestState:
        """`mm`: the prompt's images (multimodal.MMInput; its placeholders are already expanded in prompt_ids)."""
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {self.max_model_len}; "
                "shorten the prompt"
            )
        rid = request_id or f"req-{next(self._ids)}"
        seq = Sequence(list(prompt_ids), params, self.eos_ids, rid, arrival=time.perf_counter(), mm=mm)
        if params.constrained:  # GrammarError (a ConfigError) if it cannot compile
            if self.grammars is None:
                raise ConfigError("this engine was built without constrained decoding (no Grammars)")
            seq.constraint = self.grammars.constraint(params)
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            raise PromptTooLongError(str(e)) from None
        if mm is not None:  # the images now: a tower that runs out of memory fails this request, not a step
            try:
                self.runner.encode(seq)
            except BaseException:
                self.scheduler.abort(seq)
                raise
        state = RequestState(seq, self.tokenizer)
        self.requests[rid] = state
        return state

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None and not state.seq.is_finished:
            self.scheduler.abort(state.seq)
            self.runner.forget(state.seq.seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    def step(self) -> list[RequestState]:
        """Run one step; return the requests that produced something (new tokens or finished).

        With overlap, a step sampled on the device stays in flight: the next call launches the following
        step (its sequences take their pending tokens on the device), then reads and applies the previous
        step's tokens while the GPU works. A sequence that ends there has one wasted step, whose token is
        dropped.
        """
        sched = self.scheduler.schedule()
        prev, self.in_flight = self.in_flight, None
        fut = self.runner.launch(sched, prev) if sched.scheduled else None
        changed = self._resolve(prev) if prev is not None else []
        if fut is None:
            return changed
        self.scheduler.advance(sched)
        if self.overlap and fut.deferred and not any(self._ends_by_length(s) for s in sched.scheduled):
            fut.kept = True
            for s in sched.scheduled:
                if s.seq.seq_id in fut.rows:
                    s.seq.pending += 1
            self.in_flight = fut
            return changed
        return list(dict.fromkeys(changed + self._resolve(fut)))

    def _resolve(self, fut: StepFuture) -> list[RequestState]:
        changed = []
        for s, r in zip(fut.sched.scheduled, fut.result(), strict=True):
            seq = s.seq
            if fut.kept and seq.seq_id in fut.rows:
                seq.pending -= 1
            if seq.is_finished:  # ended (stop token, abort) after this step was launched: drop its token
                continue
            seq.prompt_logprobs.extend(r.prompt_logprobs)
            if r.token is not None:
                changed.append(self._apply(seq, r))
        return changed

    def _ends_by_length(self, s: ScheduledSeq) -> bool:
        """The token this step samples for `s` is its last by max_tokens or the context (known in advance)."""
        seq = s.seq
        n = seq.params.max_tokens
        return s.samples and (
            (n is not None and len(seq.output_ids) + 1 >= n) or seq.num_tokens + 1 >= self.max_model_len
        )

    def _apply(self, seq: Sequence, r: SeqResult) -> RequestState:
        state = self.requests[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.output_ids.append(r.token)
        if seq.constraint is not None:
            seq.constraint.apply(r.token, r.token in seq.eos_ids)
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

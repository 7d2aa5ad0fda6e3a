"""The chat and legacy completion endpoints: request -> engine requests -> response or SSE stream.

Each choice (n per prompt) is one engine request; all of a call's requests post their deltas to one queue,
tagged with the choice index. Requests are added inside the response's generator, after every field was
validated, so a client that goes away at any point aborts exactly the requests it started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from spillover.engine.async_engine import AsyncEngine, _Tagged
from spillover.engine.output import RequestOutput
from spillover.engine.sampling import SamplingParams
from spillover.errors import SpilloverError
from spillover.loading.chat_template import select_template
from spillover.loading.generation_config import resolve_sampling
from spillover.server import schemas as S
from spillover.server import sse
from spillover.server.errors import APIError, from_spillover
from spillover.server.limits import Admission, QueueFull, ServerLimits, Ticket
from spillover.server.metrics import Metrics
from spillover.server.tokens import TokenTexts
from spillover.structured.api import response_schema, stream_deltas, tool_message, with_constraint
from spillover.structured.tools import plan_tools, render_messages

DISCONNECT_POLL_S = 0.5


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: Any | None
    model_name: str
    aliases: frozenset[str]
    max_model_len: int
    vocab_size: int
    created: int = field(default_factory=S.now)
    texts: TokenTexts | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    metrics: Metrics = field(default_factory=Metrics)
    gate: Admission | None = None
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # from the model's generation_config.json
    images: Any = None  # LLM.prepare_images: (ids, image refs, allow_remote) -> (ids, MMInput | None)

    def __post_init__(self) -> None:
        self.texts = TokenTexts(self.tokenizer) if self.tokenizer is not None else None
        self.gate = Admission(self.limits.max_queued_seqs)

    def admit(self, job: Job) -> Ticket:
        """Take the job's place in the queue, or refuse it: 503 when the engine is dead, 429 when full."""
        if not self.engine.alive:
            self.metrics.rejected[503] += 1
            raise APIError(503, "the engine has stopped; this server cannot answer (see its log)", None,
                           "engine_dead")  # fmt: skip
        try:
            return self.gate.acquire(len(job.prompts) * job.n)
        except QueueFull as e:
            self.metrics.rejected[429] += 1
            raise APIError(429, str(e), None, "server_busy") from None

    def check_model(self, name: str) -> None:
        if name != self.model_name and name not in self.aliases:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{self.model_name}'",
                           "model", "model_not_found")  # fmt: skip


@dataclass
class Job:
    """One API call: its prompts and per-choice sampling parameters."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice, choice i of prompt p is index p * n + i
    n: int
    tools: Any = None  # structured.tools.ToolPlan when calls are parsed out of the answers
    mms: list[Any] | None = None  # per prompt: its images (multimodal.MMInput) or None

    def choices(self) -> list[tuple[int, list[int], SamplingParams]]:
        return [
            (p * self.n + i, ids, self.params[i]) for p, ids in enumerate(self.prompts) for i in range(self.n)
        ]

    def mm(self, index: int) -> Any:
        """The images of choice `index`'s prompt."""
        return self.mms[index // self.n] if self.mms else None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ----------------------------------------------------------------------------- request -> job


SAMPLING_FALLBACK = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_params(
    req: S._Sampling, max_tokens: int | None, logprobs: int | None, model: dict[str, Any] | None = None
) -> list[SamplingParams]:
    """Fields the request leaves unset take the model's generation_config.json values (`model`), then
    OpenAI's defaults."""
    top_k = None if req.top_k is None else max(req.top_k, 0)  # -1 or 0: off
    explicit = dict(temperature=req.temperature, top_p=req.top_p, top_k=top_k, min_p=req.min_p,
                    repetition_penalty=req.repetition_penalty)  # fmt: skip
    base = dict(
        **resolve_sampling(explicit, model or {}, SAMPLING_FALLBACK), max_tokens=max_tokens,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        stop=list(req.stop or []), logprobs=logprobs, ignore_eos=req.ignore_eos,
    )  # fmt: skip
    try:
        return [SamplingParams(**base, seed=None if req.seed is None else req.seed + i) for i in range(req.n)]
    except SpilloverError as e:
        raise from_spillover(e) from None


def check_seq_count(state: ServerState, num_prompts: int, n: int, param: str) -> None:
    if num_prompts * n > state.limits.max_seqs_per_request:
        raise APIError(400, f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                       f"this server takes at most {state.limits.max_seqs_per_request} per request "
                       "(spillover serve --max-seqs-per-request)", param, "invalid_value")  # fmt: skip


def check_lengths(state: ServerState, prompts: list[list[int]], max_tokens: int | None, param: str) -> None:
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param, "invalid_value")
        if len(ids) >= state.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens but this model's context is {state.max_model_len} "
                           "tokens; shorten it", param, "context_length_exceeded")  # fmt: skip
        if max_tokens is not None and len(ids) + max_tokens > state.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens asks for {max_tokens} more, but "
                           f"this model's context is {state.max_model_len} tokens; lower max_tokens",
                           "max_tokens", "context_length_exceeded")  # fmt: skip


def chat_job(state: ServerState, req: S.ChatCompletionRequest) -> Job:
    """Validate and tokenize a chat request (a blocking call: the handlers run it in a worker thread)."""
    state.check_model(req.model)
    check_seq_count(state, 1, req.n, "n")
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer; use /v1/completions with token ids", "messages")
    images = [url for m in req.messages for url in m.images()]
    if images and state.images is None:
        raise APIError(400, "this model takes no images; send text only", "messages", "invalid_value")
    plan, messages, tools = chat_tools(state, req)
    try:
        ids = state.tokenizer.encode_chat(messages, tools=tools)
    except SpilloverError as e:
        raise APIError(
            400, f"the chat template rejected the messages: {e}", "messages", "invalid_value"
        ) from None
    mm = None
    if images:
        try:
            ids, mm = state.images(ids, images, state.limits.allow_remote_images)
        except SpilloverError as e:
            raise APIError(400, str(e), "messages", "invalid_image") from None
    max_tokens = req.max_completion_tokens or req.max_tokens or state.sampling_defaults.get("max_tokens")
    check_lengths(state, [ids], max_tokens, "messages")
    lp = (req.top_logprobs or 0) if req.logprobs else None
    params = structured_params(
        state, req, sampling_params(req, max_tokens, lp, state.sampling_defaults), plan
    )
    return Job([ids], params, req.n, plan if plan.active else None, [mm] if mm is not None else None)


def chat_tools(state: ServerState, req: S.ChatCompletionRequest):
    """The tool plan (structured/tools.py) and the messages and tools for the chat template."""
    try:
        template = select_template(state.tokenizer.chat_template, req.tools or None)
    except SpilloverError:
        template = None  # encode_chat says why
    try:
        plan = plan_tools(template, req.tools, req.tool_choice, req.parallel_tool_calls)
    except SpilloverError as e:
        raise from_spillover(e, "tool_choice") from None
    messages = [
        {"role": m.role, "content": None if m.content is None and m.tool_calls else m.template_content(),
         "name": m.name,
         "tool_calls": [c.model_dump() for c in m.tool_calls] if m.tool_calls else None,
         "tool_call_id": m.tool_call_id}
        for m in req.messages
    ]  # fmt: skip
    messages, tools = render_messages(messages, plan)
    return plan, messages, tools


def structured_params(state: ServerState, req: S.ChatCompletionRequest, params: list[SamplingParams], plan):
    """response_format, or tool_choice required / named -> a grammar constraint, compiled now so that a bad
    schema is a 400."""
    param = "tools" if plan.grammar() else "response_format"
    try:
        grammar = plan.grammar()
        if grammar is not None:
            params = with_constraint(params, grammar=grammar)
        elif (schema := response_schema(req.response_format)) is not None:
            params = with_constraint(params, json_schema=schema)
        else:
            return params
        state.engine.engine.grammars.compile(params[0])
    except SpilloverError as e:
        raise from_spillover(e, param) from None
    return params


def completion_job(state: ServerState, req: S.CompletionRequest) -> Job:
    state.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", "echo", "unsupported")
    p = req.prompt
    num = 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)
    check_seq_count(state, num, req.n, "n" if num == 1 else "prompt")
    if isinstance(p, str) or (p and isinstance(p[0], str)):
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send the prompt as token ids", "prompt")
        prompts = [state.tokenizer.encode(t) for t in ([p] if isinstance(p, str) else p)]
    else:
        prompts = [list(p)] if isinstance(p[0], int) else [list(x) for x in p]
        if any(not 0 <= t < state.vocab_size for ids in prompts for t in ids):
            raise APIError(400, f"token ids must be in [0, {state.vocab_size})", "prompt", "invalid_value")
    check_lengths(state, prompts, req.max_tokens, "prompt")
    return Job(prompts, sampling_params(req, req.max_tokens, req.logprobs, state.sampling_defaults), req.n)


# ----------------------------------------------------------------------------- running a job


class Run:
    """The engine requests of one job; iterate to get (choice index, delta); close() aborts leftovers."""

    def __init__(self, engine: AsyncEngine, job: Job) -> None:
        self.engine, self.job = engine, job
        self.sink: asyncio.Queue[_Tagged] = asyncio.Queue()
        self.live: dict[int, str] = {}  # choice index -> request id, until finished

    async def start(self) -> None:
        for idx, ids, params in self.job.choices():
            self.live[idx] = await self.engine.add(ids, params, self.sink, tag=idx, mm=self.job.mm(idx))

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.live:
            got = await self.sink.get()
            if isinstance(got.item, BaseException):
                raise got.item
            if got.item.finished:
                self.live.pop(got.tag, None)
            yield got.tag, got.item

    def close(self) -> None:
        for rid in self.live.values():
            self.engine.abort(rid)
        self.live.clear()


@dataclass
class Acc:
    """A choice's accumulated output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, d: RequestOutput) -> None:
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        self.logprobs.extend(d.logprobs or [])
        self.finish_reason = d.finish_reason or self.finish_reason


async def collect(request: Request, engine: AsyncEngine, job: Job) -> dict[int, Acc]:
    """Run a job to the end; aborts it if the client goes away meanwhile."""
    run = Run(engine, job)
    accs = {idx: Acc() for idx, _, _ in job.choices()}

    async def consume() -> None:
        await run.start()
        async for idx, d in run.deltas():
            accs[idx].add(d)

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()
                return accs
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    except SpilloverError as e:
        raise from_spillover(e) from None
    finally:
        task.cancel()
        run.close()


def finish_reason(r: str | None) -> str | None:
    return "stop" if r == "abort" else r


def usage(job: Job, accs: dict[int, Acc] | None = None, completion: int | None = None) -> S.Usage:
    c = completion if completion is not None else sum(len(a.token_ids) for a in (accs or {}).values())
    return S.Usage(prompt_tokens=job.prompt_tokens, completion_tokens=c, total_tokens=job.prompt_tokens + c)


# ----------------------------------------------------------------------------- logprobs


def chat_logprobs(texts: TokenTexts | None, lps: list) -> S.ChoiceLogprobs:
    def top(tid: int, lp: float) -> S.TopLogprob:
        s, b = (texts.text_of(tid), list(texts.bytes_of(tid))) if texts else (str(tid), None)
        return S.TopLogprob(token=s, logprob=lp, bytes=b)

    content = [S.TokenLogprobOut(**top(t.token_id, t.logprob).model_dump(), top_logprobs=[top(i, v) for i, v in t.top])
               for t in lps]  # fmt: skip
    return S.ChoiceLogprobs(content=content)


def legacy_logprobs(texts: TokenTexts | None, lps: list, offset: int = 0) -> S.LegacyLogprobs:
    def s(tid: int) -> str:
        return texts.text_of(tid) if texts else str(tid)

    out = S.LegacyLogprobs()
    for t in lps:
        tok = s(t.token_id)
        out.tokens.append(tok)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({s(i): v for i, v in t.top} or None)
        out.text_offset.append(offset)
        offset += len(tok)
    return out


# ----------------------------------------------------------------------------- responses


async def chat_completion(request: Request, state: ServerState, req: S.ChatCompletionRequest):
    job = await run_in_threadpool(chat_job, state, req)  # templates and tokenizing stay off the event loop
    ticket = state.admit(job)
    rid, created = S.new_id("chatcmpl"), S.now()
    if req.stream:
        return _stream(request, state, job, ticket, lambda d: chat_chunks(state, req, job, rid, created, d))
    accs = await _collect_counted(request, state, job, ticket)
    choices = []
    for i, a in sorted(accs.items()):
        content, calls, reason = a.text, None, finish_reason(a.finish_reason)
        if job.tools is not None:
            content, calls, reason = tool_message(job.tools, a.text, reason)
        choices.append(S.ChatChoice(
            index=i,
            message=S.AssistantMessage(content=content, tool_calls=calls),
            finish_reason=reason,
            logprobs=chat_logprobs(state.texts, a.logprobs) if req.logprobs else None,
        ))  # fmt: skip
    body = S.ChatCompletion(id=rid, created=created, model=req.model, choices=choices, usage=usage(job, accs))
    return JSONResponse(body.model_dump())


async def completion(request: Request, state: ServerState, req: S.CompletionRequest):
    job = await run_in_threadpool(completion_job, state, req)
    ticket = state.admit(job)
    rid, created = S.new_id("cmpl"), S.now()
    if req.stream:
        return _stream(
            request, state, job, ticket, lambda d: completion_chunks(state, req, job, rid, created, d)
        )
    accs = await _collect_counted(request, state, job, ticket)
    choices = [
        S.CompletionChoice(
            index=i,
            text=a.text,
            finish_reason=finish_reason(a.finish_reason),
            logprobs=legacy_logprobs(state.texts, a.logprobs) if req.logprobs is not None else None,
        )  # fmt: skip
        for i, a in sorted(accs.items())
    ]
    body = S.Completion(id=rid, created=created, model=req.model, choices=choices, usage=usage(job, accs))
    return JSONResponse(body.model_dump())


Deltas = AsyncIterator[tuple[int, RequestOutput]]


async def _collect_counted(request: Request, state: ServerState, job: Job, ticket: Ticket) -> dict[int, Acc]:
    try:
        accs = await collect(request, state.engine, job)
    finally:
        ticket.release()
    state.metrics.count_job(
        job.prompt_tokens,
        sum(len(a.token_ids) for a in accs.values()),
        [a.finish_reason for a in accs.values()],
    )
    return accs


def _stream(
    request: Request,
    state: ServerState,
    job: Job,
    ticket: Ticket,
    render: Callable[[Deltas], AsyncIterator[str]],
):
    async def counted(deltas: Deltas) -> Deltas:
        generated, reasons = 0, []
        async for idx, d in deltas:
            generated += len(d.token_ids)
            if d.finished:
                reasons.append(d.finish_reason)
            yield idx, d
        state.metrics.count_job(job.prompt_tokens, generated, reasons)

    async def body() -> AsyncIterator[str]:
        run = Run(state.engine, job)
        try:
            await run.start()
            async for line in render(counted(run.deltas())):
                yield line
        except SpilloverError as e:
            yield sse.event(from_spillover(e).body())
        finally:
            run.close()  # client gone (cancelled) or error: abort what is still running
            ticket.release()
        yield sse.DONE

    # the ticket is also released after the response, should the body never have been iterated
    return StreamingResponse(
        body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS, background=BackgroundTask(ticket.release)
    )


async def chat_chunks(
    state: ServerState, req: S.ChatCompletionRequest, job: Job, rid: str, created: int, deltas: Deltas
):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[S.ChatChunkChoice]) -> str:
        return sse.event(S.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices))

    yield chunk(
        [S.ChatChunkChoice(index=i, delta=S.Delta(role="assistant", content="")) for i, _, _ in job.choices()]
    )
    completion_tokens = 0
    parsers = {i: job.tools.parser() for i, _, _ in job.choices()} if job.tools is not None else {}
    async for idx, d in deltas:
        completion_tokens += len(d.token_ids)
        lp = chat_logprobs(state.texts, d.logprobs or []) if req.logprobs else None
        reason = finish_reason(d.finish_reason)
        if idx in parsers:  # tool calls: content and calls as the parser finds them (structured/tools.py)
            p = parsers[idx]
            for fields in stream_deltas(p.push(d.text) + (p.finish() if d.finished else [])):
                yield chunk([S.ChatChunkChoice(index=idx, delta=S.Delta(**fields), logprobs=lp)])
                lp = None
            reason = "tool_calls" if p.calls and reason == "stop" else reason
        elif d.text or d.logprobs:
            yield chunk([S.ChatChunkChoice(index=idx, delta=S.Delta(content=d.text), logprobs=lp)])
        if d.finished:
            yield chunk([S.ChatChunkChoice(index=idx, delta=S.Delta(), finish_reason=reason)])
    if include_usage:
        last = S.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                     usage=usage(job, completion=completion_tokens))  # fmt: skip
        yield sse.event(last)


async def completion_chunks(
    state: ServerState, req: S.CompletionRequest, job: Job, rid: str, created: int, deltas: Deltas
):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    completion_tokens = 0
    offsets: dict[int, int] = {}
    async for idx, d in deltas:
        completion_tokens += len(d.token_ids)
        lp = None
        if req.logprobs is not None:
            lp = legacy_logprobs(state.texts, d.logprobs or [], offsets.get(idx, 0))
            offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp.tokens)
        choice = S.CompletionChoice(
            index=idx, text=d.text, finish_reason=finish_reason(d.finish_reason), logprobs=lp
        )
        yield sse.event(S.Completion(id=rid, created=created, model=req.model, choices=[choice]))
    if include_usage:
        yield sse.event(S.Completion(id=rid, created=created, model=req.model, choices=[],
                                     usage=usage(job, completion=completion_tokens)))  # fmt: skip

"""The engine for asyncio code: a background thread runs the step loop, requests stream through queues.

`AsyncEngine` owns an `Engine` from the moment it starts: only its thread touches the engine (scheduler,
runner, request states), so there are no locks around model code. Asyncio code talks to it through a
command queue (add, abort) and gets each request's deltas (`RequestOutput` chunks) on an `asyncio.Queue`,
posted once per engine step with `loop.call_soon_threadsafe`.

`AsyncLLM` is the SDK face of it, for embedding spillover in another asyncio server:

    llm = AsyncLLM(LLM("model.gguf"))           # or AsyncLLM.load("model.gguf", max_batch_size=8)
    out = await llm.chat(messages, SamplingParams(max_tokens=64))
    async for delta in llm.stream_chat(messages):
        print(delta.text, end="")
    await llm.close()

Once an `LLM` is wrapped, do not call its blocking `generate`/`chat` as well: the engine belongs to the
background thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spillover.engine.output import RequestOutput, sequence_metrics
from spillover.engine.sampling import SamplingParams
from spillover.errors import SpilloverError

if TYPE_CHECKING:
    from spillover.engine.engine import Engine
    from spillover.llm import LLM

log = logging.getLogger(__name__)

Sink = Callable[[Any], None]


class EngineDeadError(SpilloverError):
    """The engine's step loop failed or was stopped; the request cannot complete."""


class EngineStepError(EngineDeadError):
    """One engine step failed: its requests fail, the engine keeps serving the next ones."""


@dataclass
class _Add:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str | None
    sink: asyncio.Queue
    tag: Any
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future
    mm: Any = None  # multimodal.MMInput: the prompt's images


@dataclass
class _Tagged:
    """What a request's queue receives: its tag and a RequestOutput delta, or an exception."""

    tag: Any
    item: RequestOutput | BaseException


class AsyncEngine:
    """Runs `engine` in a background thread; `add()` returns a request id, deltas arrive on `sink`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, Any]] = {}
        self.steps = self.failed_steps = 0  # counters for the server's /metrics (read without locks)
        self.step_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="spillover-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- asyncio side

    async def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: asyncio.Queue,
        tag: Any = None,
        request_id: str | None = None,
        mm: Any = None,
    ) -> str:
        """Queue a request; returns its id once the engine took it (raises its validation error if not).
        `sink` receives `_Tagged(tag, delta)` items; the last delta has `finished` set."""
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._send(_Add(list(prompt_ids), params, request_id, sink, tag, loop, fut, mm))
        return await fut

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (thread-safe, returns at once)."""
        self._send(("abort", request_id))

    def call(self, fn: Callable[[Engine], Any]) -> asyncio.Future:
        """Run `fn(engine)` on the engine thread between steps (e.g. to read the free block count)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._send(("call", fn, loop, fut))
        return fut

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _send(self, cmd: Any) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside a step: the thread ends; /health reports it, requests fail
            log.exception("the engine thread stopped")
            self._stopping = True
            self._fail_all(EngineDeadError(f"the engine stopped: {e!r}"))

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._drain()
            if not self.engine.has_work():
                self._wake.wait()
                continue
            t0 = time.perf_counter()
            try:
                changed = self.engine.step()
            except Exception as e:  # a bug or a device error: fail the requests in flight, keep serving
                self.failed_steps += 1
                log.exception("engine step failed; aborting %d requests", len(self._routes))
                self._fail_all(EngineStepError(f"the engine step failed: {e!r}"))
                continue
            self.steps += 1
            self.step_seconds += time.perf_counter() - t0
            self._publish(changed)
        self._drain()
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                self._add(cmd)
            elif cmd[0] == "abort":
                self._abort(cmd[1])
            elif cmd[0] == "call":
                _, fn, loop, fut = cmd
                try:
                    _resolve(loop, fut, fn(self.engine))
                except Exception as e:
                    _resolve(loop, fut, exc=e)

    def _add(self, cmd: _Add) -> None:
        try:
            state = self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id, mm=cmd.mm)
        except Exception as e:
            _resolve(cmd.loop, cmd.accepted, exc=e)
            return
        rid = state.seq.request_id
        self._routes[rid] = (cmd.loop, cmd.sink, cmd.tag)
        _resolve(cmd.loop, cmd.accepted, rid)

    def _abort(self, rid: str) -> None:
        if self._routes.pop(rid, None) is not None:
            self.engine.abort(rid)

    def _publish(self, changed: list) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, _Tagged]]] = {}
        for state in changed:
            rid = state.seq.request_id
            route = self._routes.get(rid)
            if route is None:
                continue
            delta = state.delta()
            if delta.finished:
                self._routes.pop(rid)
                self.engine.requests.pop(rid, None)
                delta.metrics = request_metrics(state.seq)
            elif not (delta.text or delta.token_ids):
                continue
            loop, sink, tag = route
            by_loop.setdefault(loop, []).append((sink, _Tagged(tag, delta)))
        for loop, items in by_loop.items():
            _post(loop, items)

    def _fail_all(self, err: BaseException) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, (loop, sink, tag) in list(self._routes.items()):
            self.engine.abort(rid)
            by_loop.setdefault(loop, []).append((sink, _Tagged(tag, err)))
        self._routes.clear()
        for loop, items in by_loop.items():
            _post(loop, items)


def request_metrics(seq: Any) -> dict[str, float]:
    out = sequence_metrics(seq)
    out["cached_prompt_tokens"] = seq.num_cached_prompt
    return out


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, _Tagged]]) -> None:
    def deliver() -> None:
        for sink, item in items:
            sink.put_nowait(item)

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the loop is closed: nobody is listening
        pass


def _resolve(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any = None, exc: BaseException | None = None
):
    def set_() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(set_)
    except RuntimeError:
        pass


# -------------------------------------------------------------------- the SDK face


class AsyncLLM:
    """An `LLM` for asyncio code: concurrent `generate`/`chat` calls batch together in one engine."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = AsyncEngine(llm.engine)

    @classmethod
    def load(cls, model: str | None = None, **kwargs: Any) -> AsyncLLM:
        """Load a model (the same keywords as `LLM`) and wrap it."""
        from spillover.llm import LLM

        return cls(LLM(model, **kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> RequestOutput:
        """One prompt (text or token ids) -> its full RequestOutput."""
        return await _collect(self.stream(prompt, params))

    async def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None
    ) -> RequestOutput:
        return await _collect(self.stream_chat(messages, params))

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of one prompt (text and token ids new since the previous one; the last is `finished`)."""
        return self.stream_ids(self.llm._ids(prompt), params)

    def stream_chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of a conversation (content parts with images for vision models, as `LLM.chat`)."""
        ids, mm = self.llm.chat_prompt(messages)
        return self.stream_ids(ids, params, mm)

    async def stream_ids(
        self, ids: list[int], params: SamplingParams | None = None, mm: Any = None
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of a token-id prompt (`mm`: its images, LLM.prepare_images). Leaving the loop early (break,
        cancellation) aborts the request."""
        sink: asyncio.Queue = asyncio.Queue()
        rid = await self.engine.add(ids, params or self.llm.default_params(), sink, mm=mm)
        done = False
        try:
            while not done:
                item = (await sink.get()).item
                if isinstance(item, BaseException):
                    raise item
                done = item.finished
                yield item
        finally:
            if not done:
                self.engine.abort(rid)

    async def generate_many(
        self, prompts: Sequence[str | list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        return list(await asyncio.gather(*(self.generate(p, params) for p in prompts)))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    def shutdown(self) -> None:
        self.engine.shutdown()


async def _collect(deltas: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Join streamed deltas into one RequestOutput."""
    out: RequestOutput | None = None
    async for d in deltas:
        if out is None:
            out = dataclasses.replace(
                d, token_ids=list(d.token_ids), logprobs=list(d.logprobs or []) or d.logprobs
            )
            continue
        out.text += d.text
        out.token_ids.extend(d.token_ids)
        if d.logprobs:
            out.logprobs = (out.logprobs or []) + list(d.logprobs)
        out.finish_reason, out.stop_reason, out.metrics = d.finish_reason, d.stop_reason, d.metrics
        out.prompt_logprobs = out.prompt_logprobs or d.prompt_logprobs
    assert out is not None
    return out

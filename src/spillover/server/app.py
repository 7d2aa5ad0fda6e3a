"""The OpenAI-compatible HTTP app: `create_app(llm)` -> a FastAPI app; `spillover serve` runs it with uvicorn.

Model names: a request's `model` must be the served name (`served_model_name`, by default a clean name:
the hub id, the .gguf file's stem or the directory's name; server/names.py) or one of its aliases: the path
it was loaded from, that path's file or directory name, the file name without extension, the hub id and the
GGUF's general.name. GET /v1/models lists the served name only. Anything else is a 404.

Authentication: with `api_key` set (or SPILLOVER_API_KEY), every /v1 route, /docs and /openapi.json need
`Authorization: Bearer <key>`; /health and /metrics stay open for load balancers and Prometheus.

Limits (server/limits.py): request body size (413), sequences per request (400), sequences accepted at once
(429 with Retry-After); a dead engine answers 503 on /health and on every request.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response

from spillover.engine.async_engine import AsyncLLM
from spillover.loading.generation_config import model_sampling_defaults
from spillover.server import handlers
from spillover.server import metrics as M
from spillover.server import schemas as S
from spillover.server.errors import APIError, install_handlers
from spillover.server.limits import BodyLimit, ServerLimits
from spillover.server.names import clean_model_name, model_aliases

log = logging.getLogger(__name__)


def create_app(
    llm: Any,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    owns_engine: bool | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """An app serving `llm` (an `LLM` or an `AsyncLLM`). An `LLM` is wrapped in an AsyncLLM whose engine
    thread the app stops at shutdown; an AsyncLLM passed in stays the caller's (unless owns_engine)."""
    async_llm = llm if isinstance(llm, AsyncLLM) else AsyncLLM(llm)
    owns = owns_engine if owns_engine is not None else async_llm is not llm
    base = async_llm.llm
    name = served_model_name or clean_model_name(base.source)
    state = handlers.ServerState(
        engine=async_llm.engine,
        tokenizer=base.tokenizer,
        model_name=name,
        aliases=model_aliases(base.source, name),
        max_model_len=base.engine.max_model_len,
        vocab_size=base.config.vocab_size,
        limits=limits or ServerLimits(),
        sampling_defaults=model_sampling_defaults(getattr(base.source, "generation_config", None)),
        images=base.prepare_images if getattr(base, "image_processor", None) is not None else None,
    )
    key = api_key if api_key is not None else os.environ.get("SPILLOVER_API_KEY") or None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns:
            await async_llm.close()

    docs = None if key else "/docs"  # with a key, the docs and the schema are served below, behind it
    app = FastAPI(title="spillover", lifespan=lifespan, docs_url=docs, redoc_url=None,
                  openapi_url=None if key else "/openapi.json")  # fmt: skip
    app.state.spillover = state
    app.state.llm = async_llm
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=state.limits.max_body_bytes)
    app.add_middleware(_CountResponses, metrics=state.metrics)  # outermost: counts the 413s too
    auth = [Depends(_auth(key))] if key else []

    if key:

        @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
        async def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", dependencies=auth, include_in_schema=False)
        async def swagger() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="spillover")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await M.render(state.metrics, state.engine, state.gate.used, state.gate.limit, name)
        return Response(text, media_type=M.CONTENT_TYPE)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> S.ModelList:
        return S.ModelList(
            data=[S.ModelCard(id=name, created=state.created, max_model_len=state.max_model_len)]
        )

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> S.ModelCard:
        state.check_model(model_id)
        return S.ModelCard(id=name, created=state.created, max_model_len=state.max_model_len)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request, body: S.ChatCompletionRequest) -> Any:
        return await handlers.chat_completion(request, state, body)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: S.CompletionRequest) -> Any:
        return await handlers.completion(request, state, body)

    return app


class _CountResponses:
    """Counts responses by route template and status for /metrics (unmatched paths count as "other")."""

    def __init__(self, app: Any, metrics: M.Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "other"
                self.metrics.count_http(route, msg["status"])
            await send(msg)

        await self.app(scope, receive, counting_send)


def _auth(key: str):
    expected = f"Bearer {key}".encode()

    async def check(request: Request) -> None:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")  # fmt: skip

    return check

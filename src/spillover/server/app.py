"""The OpenAI-compatible HTTP app: `create_app(llm)` -> a FastAPI app; `spillover serve` runs it with uvicorn.

Model names: a request's `model` must be the served name (`served_model_name`, by default the model's own
name from its metadata, e.g. general.name of a GGUF or the directory name of an HF model) or one of its
aliases: the path it was loaded from, that path's file or directory name, and the file name without
extension. GET /v1/models lists the served name only. Anything else is a 404.

Authentication: with `api_key` set (or SPILLOVER_API_KEY), every /v1 route needs `Authorization: Bearer
<key>`; /health stays open for load balancers.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from spillover.engine.async_engine import AsyncLLM
from spillover.server import handlers
from spillover.server import schemas as S
from spillover.server.errors import APIError, install_handlers

log = logging.getLogger(__name__)


def model_aliases(source_path: str | None, name: str) -> frozenset[str]:
    out = {name}
    if source_path:
        p = Path(source_path)
        out |= {source_path, str(p.resolve()), p.name, p.stem}
    return frozenset(a for a in out if a)


def create_app(
    llm: Any,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    owns_engine: bool | None = None,
) -> FastAPI:
    """An app serving `llm` (an `LLM` or an `AsyncLLM`). An `LLM` is wrapped in an AsyncLLM whose engine
    thread the app stops at shutdown; an AsyncLLM passed in stays the caller's (unless owns_engine)."""
    async_llm = llm if isinstance(llm, AsyncLLM) else AsyncLLM(llm)
    owns = owns_engine if owns_engine is not None else async_llm is not llm
    base = async_llm.llm
    name = served_model_name or base.source.name
    state = handlers.ServerState(
        engine=async_llm.engine,
        tokenizer=base.tokenizer,
        model_name=name,
        aliases=model_aliases(base.source.path, name),
        max_model_len=base.engine.max_model_len,
        vocab_size=base.config.vocab_size,
    )
    key = api_key if api_key is not None else os.environ.get("SPILLOVER_API_KEY") or None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns:
            await async_llm.close()

    app = FastAPI(title="spillover", lifespan=lifespan)
    app.state.spillover = state
    app.state.llm = async_llm
    install_handlers(app)
    auth = [Depends(_auth(key))] if key else []

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

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


def _auth(key: str):
    expected = f"Bearer {key}".encode()

    async def check(request: Request) -> None:
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, expected):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")  # fmt: skip

    return check

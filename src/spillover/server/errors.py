"""Errors in OpenAI's format: {"error": {"message", "type", "param", "code"}} with the matching status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spillover.engine.async_engine import EngineDeadError, EngineStepError
from spillover.errors import ConfigError, PromptTooLongError, SpilloverError, TokenizerMissingError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_spillover(e: SpilloverError, param: str | None = None) -> APIError:
    """Map a user-facing engine error to an API error."""
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), param, "context_length_exceeded")
    if isinstance(e, (ConfigError, TokenizerMissingError)):
        return APIError(400, str(e), param, "invalid_value")
    if isinstance(e, EngineStepError):
        return APIError(500, str(e), None, "engine_error")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), None, "engine_dead")
    return APIError(500, str(e), None, "engine_error")


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errs = e.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(e)
        return APIError(400, msg, param, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), None, None).response()

    @app.exception_handler(SpilloverError)
    async def _engine(_: Request, e: SpilloverError) -> JSONResponse:
        return from_spillover(e).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}", None, "internal_error").response()

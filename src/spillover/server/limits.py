"""What one client may ask of the server: body size, sequences per request, sequences queued in all.

- `BodyLimit`: an ASGI middleware answering 413 to a body over `max_body_bytes` (by Content-Length at once,
  or as soon as a chunked body passes the limit), before anything is parsed;
- `ServerLimits.max_seqs_per_request`: prompts x n of one request (a 400 beyond it);
- `Admission`: the sequences the server has accepted and not finished; a request that would go beyond
  `max_queued_seqs` gets a 429 with Retry-After, like a busy llama-server slot or an overloaded vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 8 * MiB  # ~2M tokens of text: far beyond any context this engine serves
    max_seqs_per_request: int = 64  # prompts x n
    max_queued_seqs: int = 256  # sequences accepted and not finished, all requests together
    allow_remote_images: bool = False  # fetch http(s) image_url parts (else 400: send data: URLs)


def _size(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k} {unit}"
    return f"{n} bytes"


def body_too_large(limit: int) -> Exception:
    """413 as starlette's HTTPException (imported here: `spillover run` reads this module's ServerLimits
    defaults for the CLI's help and should not pay starlette's import)."""
    from starlette.exceptions import HTTPException

    return HTTPException(413, f"the request body is larger than this server's limit of {_size(limit)} "
                         "(spillover serve --max-body-size)")  # fmt: skip


def _error_body(status: int, message: str) -> bytes:
    err = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    return json.dumps({"error": err}).encode()


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, without reading (or buffering) the rest."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            e = body_too_large(self.limit)
            body = _error_body(413, str(e.detail))
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                    (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise body_too_large(self.limit)  # FastAPI re-raises HTTPExceptions from body reading
            return msg

        await self.app(scope, limited, send)


class QueueFull(Exception):
    pass


class Admission:
    """Sequences accepted and not yet finished. The event loop is the only user: no locks."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def acquire(self, k: int) -> Ticket:
        if self.used + k > self.limit:
            raise QueueFull(f"the server is busy: {self.used} sequences are running or queued and this request "
                            f"adds {k} (limit {self.limit}, spillover serve --max-queued); retry later")  # fmt: skip
        self.used += k
        return Ticket(self, k)


class Ticket:
    """One request's share of the queue; `release()` is idempotent."""

    def __init__(self, gate: Admission, k: int) -> None:
        self.gate, self.k = gate, k

    def release(self) -> None:
        if self.k:
            self.gate.used -= self.k
            self.k = 0

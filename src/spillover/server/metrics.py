"""GET /metrics in Prometheus' text format (version 0.0.4), with names in the spirit of vLLM's `vllm:*`.

Server counters (HTTP responses by route and status, prompt and generated tokens, finished sequences by
reason) live here; engine gauges (running / waiting sequences, KV blocks) are read on the engine thread when
scraped, and step counters come from `AsyncEngine` (steps, failed steps, seconds spent in steps).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENGINE_READ_TIMEOUT_S = 2.0


class Metrics:
    def __init__(self) -> None:
        self.http: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()
        self.rejected: Counter[int] = Counter()

    def count_http(self, route: str, status: int) -> None:
        self.http[(route, status)] += 1

    def count_job(self, prompt_tokens: int, generation_tokens: int, reasons: list[str | None]) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        for r in reasons:
            self.finished[r or "unknown"] += 1


def _engine_snapshot(e: Any) -> dict[str, float]:
    s = e.scheduler
    return {
        "running": len(s.running),
        "waiting": len(s.waiting),
        "blocks_free": s.blocks.num_free,
        "blocks_total": s.blocks.num_blocks,
    }


async def render(metrics: Metrics, engine: Any, queued: int, queue_limit: int, model: str) -> str:
    """The exposition text. Engine gauges are left out when the engine does not answer in time."""
    snap: dict[str, float] | None = None
    if engine.alive:
        try:
            snap = await asyncio.wait_for(engine.call(_engine_snapshot), ENGINE_READ_TIMEOUT_S)
        except (asyncio.TimeoutError, Exception):
            snap = None
    lab = f'model_name="{_esc(model)}"'
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP spillover_{name} {help_}")
        out.append(f"# TYPE spillover_{name} {kind}")
        for labels, v in samples:
            out.append(f"spillover_{name}{{{labels}}} {_num(v)}")

    metric("http_requests_total", "counter", "HTTP responses by route and status code.",
           [(f'{lab},route="{_esc(r)}",status="{s}"', n) for (r, s), n in sorted(metrics.http.items())])  # fmt: skip
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        [(lab, metrics.prompt_tokens)],
    )
    metric("generation_tokens_total", "counter", "Tokens generated for finished requests.",
           [(lab, metrics.generation_tokens)])  # fmt: skip
    metric("request_success_total", "counter", "Finished sequences by finish reason.",
           [(f'{lab},finished_reason="{_esc(r)}"', n) for r, n in sorted(metrics.finished.items())])  # fmt: skip
    metric("requests_rejected_total", "counter", "Requests refused by a server limit, by status code.",
           [(f'{lab},status="{s}"', n) for s, n in sorted(metrics.rejected.items())])  # fmt: skip
    metric(
        "queued_sequences", "gauge", "Sequences accepted and not finished (all requests).", [(lab, queued)]
    )
    metric("queued_sequences_limit", "gauge", "The most sequences accepted at once (--max-queued).",
           [(lab, queue_limit)])  # fmt: skip
    metric("engine_alive", "gauge", "1 while the engine thread runs.", [(lab, 1 if engine.alive else 0)])
    metric("engine_steps_total", "counter", "Engine steps run.", [(lab, getattr(engine, "steps", 0))])
    metric("engine_failed_steps_total", "counter", "Engine steps that raised (their requests failed).",
           [(lab, getattr(engine, "failed_steps", 0))])  # fmt: skip
    metric("engine_step_seconds_total", "counter", "Wall time spent in engine steps.",
           [(lab, getattr(engine, "step_seconds", 0.0))])  # fmt: skip
    if snap is not None:
        metric("num_requests_running", "gauge", "Sequences in the running batch.", [(lab, snap["running"])])
        metric("num_requests_waiting", "gauge", "Sequences waiting for a slot.", [(lab, snap["waiting"])])
        used = snap["blocks_total"] - snap["blocks_free"]
        metric("kv_blocks_used", "gauge", "KV-cache blocks in use.", [(lab, used)])
        metric("kv_blocks_free", "gauge", "KV-cache blocks free.", [(lab, snap["blocks_free"])])
        metric("kv_cache_usage_perc", "gauge", "KV-cache usage (1 = full).",
               [(lab, used / snap["blocks_total"] if snap["blocks_total"] else 0.0)])  # fmt: skip
    return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

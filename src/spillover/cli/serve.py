"""`spillover serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from spillover.cli.common import add_mapping_args, add_model_args, mmproj_arg, preflight_hub
from spillover.config import parse_bytes
from spillover.errors import ConfigError
from spillover.server.limits import ServerLimits

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health).",
    )
    add_model_args(p)
    add_mapping_args(p)
    add_pool_args(p)
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    g.add_argument("--port", type=int, default=1234, help="port (default 1234)")
    k = g.add_mutually_exclusive_group()
    k.add_argument(
        "--api-key", default=None,
        help="require 'Authorization: Bearer KEY' (visible in `ps`: prefer --api-key-file or $SPILLOVER_API_KEY)",
    )  # fmt: skip
    k.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    g.add_argument(
        "--served-model-name", default=None, help="the model id clients use (default: the model's name)"
    )
    g.add_argument("--access-log", action="store_true", help="log every HTTP request (at INFO)")
    lim = p.add_argument_group("server limits")
    d = ServerLimits()
    lim.add_argument(
        "--max-body-size", default=f"{d.max_body_bytes >> 20}MiB", metavar="SIZE",
        help=f"largest request body; bigger ones get 413 (default {d.max_body_bytes >> 20}MiB)",
    )  # fmt: skip
    lim.add_argument(
        "--max-seqs-per-request", type=int, default=d.max_seqs_per_request, metavar="N",
        help=f"most prompts x n in one request; more get 400 (default {d.max_seqs_per_request})",
    )  # fmt: skip
    lim.add_argument(
        "--max-queued", type=int, default=d.max_queued_seqs, metavar="N",
        help=f"most sequences running or waiting at once; requests beyond get 429 (default {d.max_queued_seqs})",
    )  # fmt: skip
    lim.add_argument(
        "--allow-remote-images", action="store_true",
        help="vision models: fetch http(s) image_url parts (default: refused with 400; send data: URLs)",
    )  # fmt: skip
    p.set_defaults(func=run)


def add_pool_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PagedAttention KV pool")
    x = g.add_mutually_exclusive_group()
    x.add_argument(
        "--pa-memory-fraction", type=float, default=None, metavar="F",
        help="CUDA: share of each GPU's memory for weights, activations and KV blocks (default 0.9)",
    )  # fmt: skip
    x.add_argument("--pa-context-len", type=int, default=None, metavar="N", help="KV pool size in tokens")


def llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM(...) keywords from the model, mapping and pool flags."""
    return dict(
        gguf_file=args.gguf_file, mmproj=mmproj_arg(args), dtype=args.dtype, max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size, max_num_images=args.max_num_images,
        max_image_length=args.max_image_length, device_map=args.device_layers,
        max_memory=args.max_memory or None, isq=args.isq, paged_attention=not args.no_paged_attn,
        pa_memory_fraction=args.pa_memory_fraction, pa_context_len=args.pa_context_len,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        n_cpu_moe=getattr(args, "n_cpu_moe", None),
    )  # fmt: skip


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file, or $SPILLOVER_API_KEY (in that order); None for no key."""
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --api-key-file: {e}") from None
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("SPILLOVER_API_KEY") or None


def server_limits(args: argparse.Namespace) -> ServerLimits:
    for flag in ("max_seqs_per_request", "max_queued"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    size = parse_bytes(args.max_body_size)
    if size < 1024:
        raise ConfigError(f"--max-body-size must be at least 1KiB, got {args.max_body_size}")
    remote = bool(getattr(args, "allow_remote_images", False))
    return ServerLimits(size, args.max_seqs_per_request, args.max_queued, remote)


def warn_if_exposed(host: str, key: str | None) -> None:
    if not key and host not in LOOPBACK:
        log.warning(
            "binding %s without an API key: anyone who can reach this port can use the model; "
            "set --api-key-file or $SPILLOVER_API_KEY", host,
        )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from spillover.llm import LLM
    from spillover.server.app import create_app

    key, limits = api_key(args), server_limits(args)  # flag errors before the model loads
    warn_if_exposed(args.host, key)
    preflight_hub(args.model, args.gguf_file)
    llm = LLM(args.model, progress=True, **llm_kwargs(args))
    t = time.perf_counter()
    graphs = llm.engine.runner.capture_graphs(args.max_batch_size, args.max_seq_len)
    if graphs:  # up front: otherwise the first request at each new batch or context size waits for a capture
        log.info("captured %d CUDA graphs for decode in %.1f s", graphs, time.perf_counter() - t)
    app = create_app(llm, served_model_name=args.served_model_name, api_key=key, limits=limits)
    name = app.state.spillover.model_name
    blocks = llm.engine.scheduler.blocks
    log.info(
        "serving '%s' on http://%s:%d/v1 (KV pool: %d blocks of %d tokens, context %d)%s",
        name, args.host, args.port, blocks.num_blocks, blocks.block_size, llm.engine.max_model_len,
        ", API key required" if key else "",
    )  # fmt: skip
    level = logging.getLogger().getEffectiveLevel()
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=max(level, logging.INFO), access_log=args.access_log
    )
    return 0

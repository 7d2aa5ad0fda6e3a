"""Load generator for `spillover serve`: N concurrent streaming clients on loopback, bounded in count and time.

Starts `spillover serve` as a subprocess (or uses --url, which must be a loopback address), sends
/v1/completions requests whose prompts are random token-id lists (so a model without a tokenizer works
too: random weights are fine, speed does not depend on their values), streams the answers and reports
requests/s, output tokens/s, time to first token and inter-token latency percentiles.

    python benchmarks/serve.py                                  # SmolLM2 on this machine, 16 clients
    python benchmarks/serve.py --concurrency 1,64 --random-model llama3-8b --max-batch-size 64

`--concurrency 1,64` runs one pass per level against the same server: the single-stream row is the
baseline for the batched one. `--random-model llama3-8b` writes a Llama-3-8B-shaped model with random
bf16 weights (about 16 GB, made on the GPU when there is one) to --random-dir and serves it.

Inter-token latency is the gap between consecutive streamed chunks of a request: the server sends one
chunk per engine step, each holding the one token that step produced for the request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from shapes import LLAMA3_8B

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

PRESETS = {
    "llama3-8b": dict(LLAMA3_8B, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16"),
}


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    latency: float = 0.0
    error: str = ""


# ------------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, model: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "spillover.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--max-seq-len", str(args.max_seq_len)]
    if model:
        cmd += ["-m", model]
    cmd += args.server_arg
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def make_random_model(preset: str, root: Path) -> Path:
    """A model directory with random bf16 weights in safetensors (Hugging Face names) and config.json."""
    import torch
    from safetensors.torch import save_file

    from spillover.config import ModelConfig
    from spillover.placement.estimate import config_tensors

    cfg = PRESETS[preset]
    path = root / f"random-{preset}"
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size, n = 0, 0
    for name, spec in config_tensors(ModelConfig.from_hf(cfg), "bf16").items():
        weight_map[name] = f"model-{n:05d}.safetensors"
        if name.endswith("norm.weight"):
            t = torch.ones(spec.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(spec.shape, generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        size += t.nbytes
        if size > 4 << 30:
            save_file(shard, str(path / f"model-{n:05d}.safetensors"))
            shard, size, n = {}, 0, n + 1
    if shard:
        save_file(shard, str(path / f"model-{n:05d}.safetensors"))
    index = {"metadata": {}, "weight_map": weight_map}  # lets transformers load the shards too
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    return path


# ------------------------------------------------------------------------------------------ load


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
) -> Result:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    res = Result()
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.gaps.append(now - last)
                last = now
        res.latency = time.perf_counter() - t0
        res.ok = res.tokens > 0
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


async def run_level(args: argparse.Namespace, url: str, model: str, vocab: int, concurrency: int) -> dict:
    rng = random.Random(args.seed)
    total = args.num_requests or 4 * concurrency
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(total)]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.duration + 60), limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, model, prompt, args.max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(concurrency, results, wall)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [g * 1e3 for r in ok for g in r.gaps]
    out = {
        "concurrency": concurrency, "requests": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "req_per_s": len(ok) / wall, "out_tok_per_s": tokens / wall,
        "per_stream_tok_per_s": statistics.mean(r.tokens / r.latency for r in ok) if ok else 0.0,
    }  # fmt: skip
    for name, vals in (("ttft_ms", ttft), ("itl_ms", itl)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = pct(vals, q)
    errors = [r.error for r in results if not r.ok]
    if errors:
        out["first_error"] = errors[0]
    return out


def print_table(rows: list[dict]) -> None:
    cols = [
        ("conc", "concurrency", "{:d}"), ("reqs", "requests", "{:d}"), ("fail", "failed", "{:d}"),
        ("req/s", "req_per_s", "{:.2f}"), ("out tok/s", "out_tok_per_s", "{:.1f}"),
        ("tok/s/stream", "per_stream_tok_per_s", "{:.1f}"),
        ("TTFT p50", "ttft_ms_p50", "{:.0f}"), ("p90", "ttft_ms_p90", "{:.0f}"), ("p99", "ttft_ms_p99", "{:.0f}"),
        ("ITL p50", "itl_ms_p50", "{:.1f}"), ("p90", "itl_ms_p90", "{:.1f}"), ("p99", "itl_ms_p99", "{:.1f}"),
    ]  # fmt: skip
    cells = [[h for h, _, _ in cols]] + [[f.format(r[k]) for _, k, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print("(TTFT and ITL in ms; ITL = gap between consecutive streamed tokens of one request)")
    for r in rows:
        if "first_error" in r:
            print(f"concurrency {r['concurrency']}: first error: {r['first_error']}")


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", default=None, help="model path or id for the server (default: SmolLM2)")
    p.add_argument(
        "--random-model", choices=sorted(PRESETS), help="serve a random-weights model of this shape"
    )
    p.add_argument("--random-dir", default=os.path.join(tempfile.gettempdir(), "spillover-bench"))
    p.add_argument("--url", default=None, help="use a running server (loopback only) instead of starting one")
    p.add_argument("--concurrency", default="16", help="concurrent clients; a comma list runs one pass each")
    p.add_argument(
        "--num-requests", type=int, default=None, help="requests per pass (default 4 x concurrency)"
    )
    p.add_argument(
        "--duration", type=float, default=120.0, help="most seconds per pass (no new requests after)"
    )
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (EOS ignored)")
    p.add_argument(
        "--max-batch-size", type=int, default=16, help="server --max-batch-size (the plan's batch)"
    )
    p.add_argument("--max-seq-len", type=int, default=1024, help="server --max-seq-len")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for `spillover serve`")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


async def bench(args: argparse.Namespace, url: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as c:
        info = (await c.get(url + "/v1/models")).json()["data"][0]
    model = info["id"]
    vocab = PRESETS[args.random_model]["vocab_size"] if args.random_model else 32000
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup, "max_tokens": 4})
        await run_level(warm, url, model, vocab, args.warmup)
    rows = []
    for level in (int(x) for x in args.concurrency.split(",")):
        rows.append(await run_level(args, url, model, vocab, level))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            raise SystemExit("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        url = args.url.rstrip("/")
    else:
        model = (
            str(make_random_model(args.random_model, Path(args.random_dir)))
            if args.random_model
            else args.model
        )
        proc, url = start_server(args, model)
    try:
        rows = asyncio.run(bench(args, url))
    finally:
        if proc is not None:
            stop_server(proc)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

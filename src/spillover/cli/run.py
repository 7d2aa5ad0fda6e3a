"""`spillover run`: chat with a model in the terminal, or answer one prompt (-p) and exit."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from spillover.cli.common import add_mapping_args, add_model_args


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=512, help="most tokens to generate per answer (default 512)"
    )
    g.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default: 0.7 in chat, 0 with -p)"
    )
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="chat with a model in the terminal (or answer one prompt with -p)",
        description="Load a model with automatic device mapping and chat with it.",
    )
    add_model_args(p)
    add_mapping_args(p)
    add_sampling_args(p)
    p.add_argument(
        "-p", "--prompt", default=None, help="answer this prompt once and exit (stdout: the answer only)"
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--raw", action="store_true", help="with -p: no chat template, plain completion")
    p.add_argument("--verbose", action="store_true", help="print the device map and prompt/decode tokens/s")
    p.add_argument(
        "--offload",
        choices=["auto", "cpu", "stream"],
        default="auto",
        help="how layers in CPU memory run: computed on the CPU, streamed to the GPU, or auto (a cost model "
        "with this machine's bandwidths picks, and may split them between both; default)",
    )
    p.set_defaults(func=run)


def load_llm(args: argparse.Namespace) -> Any:
    from spillover.llm import LLM

    return LLM(
        args.model,
        gguf_file=args.gguf_file,
        device_map=args.device_layers,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        max_num_images=args.max_num_images,
        max_image_length=args.max_image_length,
        max_memory=args.max_memory,
        isq=args.isq,
        paged_attention=not args.no_paged_attn,
        offload=getattr(args, "offload", "auto"),
    )


def sampling_from_args(args: argparse.Namespace, default_temperature: float) -> Any:
    from spillover.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=default_temperature if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(args.stop),
    )


def run(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    if args.verbose:
        print(
            f"device map: {llm.device_map.summary()} ({llm.dtype}); loaded in {llm.load_seconds:.2f} s",
            file=sys.stderr,
        )
    if args.prompt is not None:
        params = sampling_from_args(args, 0.0)
        messages = _with_system(args.system, [{"role": "user", "content": args.prompt}])
        chunks = (
            llm.generate(args.prompt, params, stream=True)
            if args.raw
            else llm.chat(messages, params, stream=True)
        )
        stats = _print_stream(chunks)
        print()
        if args.verbose:
            _print_timings(stats)
        return 0
    return _interactive(llm, args)


def _with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def _print_stream(chunks: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    first = None
    n = 0
    for c in chunks:
        if first is None and c.token_ids:
            first = time.perf_counter()
        n += len(c.token_ids)
        sys.stdout.write(c.text)
        sys.stdout.flush()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tokens": n, "decode_s": end - (first or end)}


def _print_timings(s: dict[str, float]) -> None:
    decode = (s["tokens"] - 1) / s["decode_s"] if s["tokens"] > 1 and s["decode_s"] > 0 else 0.0
    print(
        f"time to first token: {s['ttft'] * 1000:.1f} ms | decode: {decode:.1f} tok/s over {int(s['tokens'])} tokens",
        file=sys.stderr,
    )


HELP = "commands: /clear (forget the conversation), /exit (quit); Ctrl-C stops an answer, Ctrl-D quits"


def _interactive(llm: Any, args: argparse.Namespace) -> int:
    params = sampling_from_args(args, 0.7)
    history: list[dict[str, str]] = []
    print(f"spillover chat with {llm.source.name} on {llm.device_map.summary()}\n{HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/clear":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd.startswith("/") and cmd.split()[0] in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        answer, interrupted, stats = _answer(llm, _with_system(args.system, history), params)
        history.append({"role": "assistant", "content": answer})
        print("\n" + ("(stopped)" if interrupted else ""), file=sys.stderr if interrupted else sys.stdout)
        if args.verbose:
            _print_timings(stats)


def _answer(llm: Any, messages: list[dict[str, str]], params: Any) -> tuple[str, bool, dict[str, float]]:
    """Stream one answer; Ctrl-C stops this answer (the request is aborted), not the program."""
    parts: list[str] = []
    t0 = time.perf_counter()
    first, n = None, 0
    stream = llm.chat(messages, params, stream=True)
    old = signal.getsignal(signal.SIGINT)
    interrupted = False
    try:
        for c in stream:
            if first is None and c.token_ids:
                first = time.perf_counter()
            n += len(c.token_ids)
            parts.append(c.text)
            sys.stdout.write(c.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()  # aborts the request if it is still running
        signal.signal(signal.SIGINT, old)
    end = time.perf_counter()
    return (
        "".join(parts),
        interrupted,
        {"ttft": (first or end) - t0, "tokens": n, "decode_s": end - (first or end)},
    )

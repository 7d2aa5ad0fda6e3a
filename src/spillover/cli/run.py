"""`spillover run`: chat with a model in the terminal, or answer one prompt (-p) and exit."""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import sys
import time
from typing import Any

from spillover.cli.common import add_mapping_args, add_model_args, mmproj_arg, preflight_hub


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (unset flags take the model's generation_config.json values)")
    g.add_argument(
        "--max-tokens", type=int, default=None, help="most tokens to generate per answer (default 512)"
    )
    g.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default: 0.7 in chat, 0 with -p)"
    )
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="chat with a model in the terminal (or answer one prompt with -p)",
        description="Load a model with automatic device mapping and chat with it. A prompt piped on stdin "
        "(echo question | spillover run) is answered once, like -p.",
    )
    add_model_args(p)
    add_mapping_args(p)
    add_sampling_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "-p", "--prompt", default=None,
        help="answer this prompt once and exit (stdout: the answer only); '-' reads it from stdin",
    )  # fmt: skip
    src.add_argument(
        "--prompt-file", default=None, metavar="PATH", help="answer the prompt in this file once"
    )
    src.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="chat even when stdin is not a terminal (read turns from it)",
    )
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH",
        help="vision models: an image for the (first) prompt, before its text (repeatable); in chat, "
        "/image PATH attaches one to the next message",
    )  # fmt: skip
    p.add_argument("--raw", action="store_true", help="with -p: no chat template, plain completion")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the device map and a timings line (tokens, tok/s, load time)",
    )
    p.add_argument(
        "--offload",
        choices=["auto", "cpu", "stream"],
        default="auto",
        help="how layers in CPU memory run: computed on the CPU, streamed to the GPU, or auto (a cost model "
        "with this machine's bandwidths picks, and may split them between both; default)",
    )
    p.set_defaults(func=run)


def load_llm(args: argparse.Namespace) -> Any:
    with no_gc_while_loading(freeze=getattr(args, "own_process", False)):
        from spillover.llm import LLM  # (imports torch)

        preflight_hub(args.model, args.gguf_file)
        return _llm(LLM, args)


@contextlib.contextmanager
def no_gc_while_loading(freeze: bool) -> Any:
    """The cyclic garbage collector off while torch is imported and a model loads: each full collection walks
    every object alive (torch's ~10^5, a tokenizer's ~10^5 strings), and the few of them during start-up cost
    ~0.2 s of a one-token run. `freeze` (a process that holds one model until it ends): what survives the load
    is moved out of the collector's reach for good (`gc.freeze`), so the first collections after it do not
    walk it all again."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was:
            gc.enable()


def _llm(LLM: Any, args: argparse.Namespace) -> Any:
    return LLM(
        args.model,
        gguf_file=args.gguf_file,
        mmproj=mmproj_arg(args),
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
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        n_cpu_moe=getattr(args, "n_cpu_moe", None),
    )


SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
CLI_DEFAULTS = {"max_tokens": 512, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_from_args(
    args: argparse.Namespace, default_temperature: float, model: dict | None = None
) -> Any:
    """Flags first, then the model's generation_config.json (`model`), then the CLI's defaults."""
    from spillover.engine.sampling import SamplingParams
    from spillover.loading.generation_config import resolve_sampling

    explicit = {k: getattr(args, k, None) for k in SAMPLING_FLAGS}
    fallback = {**CLI_DEFAULTS, "temperature": default_temperature}
    kw = resolve_sampling(explicit, model or {}, fallback)
    return SamplingParams(**kw, seed=args.seed, stop=list(args.stop))


def _read_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def one_shot_prompt(args: argparse.Namespace) -> str | None:
    """The prompt to answer once: -p TEXT, -p - (stdin), --prompt-file, or stdin when it is a pipe or file
    (not with -i). None: chat interactively."""
    from spillover.errors import ConfigError

    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                text = _read_text(f.read()).strip()
        except OSError as e:
            raise ConfigError(f"cannot read --prompt-file: {e}") from None
    elif args.prompt == "-" or (args.prompt is None and not args.interactive and not _stdin_is_terminal()):
        text = (
            _read_text(sys.stdin.buffer.read()) if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        ).strip()
    else:
        text = args.prompt
    if text is not None and not text.strip():
        raise ConfigError("the prompt is empty; give some text with -p, --prompt-file or on stdin")
    return text


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):
        return False


def quantization(llm: Any) -> str:
    """What the weights are stored as: the GGUF type holding most bytes (Q4_1, Q4_K...), or the ISQ."""
    isq = (getattr(getattr(llm, "plan", None), "params", None) or {}).get("isq")
    if isq:
        return f"ISQ int{isq}" if isinstance(isq, int) else f"ISQ {isq}"
    by: dict[str, int] = {}
    for t in getattr(llm.source, "tensors", {}).values():
        if len(t.shape) == 2:
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    return max(by, key=by.get).upper() if by else "unknown"


def run(args: argparse.Namespace) -> int:
    from spillover.loading.generation_config import model_sampling_defaults
    from spillover.server.names import clean_model_name

    prompt = one_shot_prompt(args)  # read (and refuse an empty one) before the model loads
    images = _read_images(args.image)  # unreadable images are refused before the model loads, too
    if images and args.raw:
        from spillover.errors import ConfigError

        raise ConfigError("--image needs the chat template: drop --raw")
    llm = load_llm(args)
    model_defaults = model_sampling_defaults(getattr(llm.source, "generation_config", None))
    if args.verbose:
        print(
            f"model: {clean_model_name(llm.source)} ({quantization(llm)}); device map: {llm.mapping_summary()} "
            f"({llm.dtype}{'; GGUF blocks kept where a CPU kernel reads them' if getattr(llm, 'native', False) else ''}); "
            f"loaded in {llm.load_seconds:.2f} s",
            file=sys.stderr,
        )
    if prompt is not None:
        params = sampling_from_args(args, 0.0, model_defaults)
        messages = _with_system(args.system, [{"role": "user", "content": _content(prompt, images)}])
        prompt_tokens = len(llm.encode(prompt) if args.raw else llm.chat_prompt(messages)[0])
        chunks = (
            llm.generate(prompt, params, stream=True) if args.raw else llm.chat(messages, params, stream=True)
        )
        stats = _print_stream(chunks)
        print()
        if args.verbose:
            _print_timings(stats, prompt_tokens, llm.load_seconds)
        llm.close()
        args.exit_now = True  # nothing left to tear down: main() may end the process at once
        return 0
    return _interactive(llm, args, model_defaults, images)


def _read_images(paths: list[str]) -> list[Any]:
    if not paths:
        return []
    from spillover.multimodal import load_image

    return [load_image(p) for p in paths]


def _content(text: str, images: list[Any]) -> Any:
    """A user message's content: the text, or with images OpenAI parts (images first)."""
    if not images:
        return text
    return [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]


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


def timings_line(s: dict[str, float], prompt_tokens: int | None = None, load_s: float | None = None) -> str:
    """llama.cpp-style: prompt tokens and tok/s (to the first token), generated tokens and tok/s, load time."""
    decode = (s["tokens"] - 1) / s["decode_s"] if s["tokens"] > 1 and s["decode_s"] > 0 else 0.0
    parts = []
    if prompt_tokens is not None:
        rate = prompt_tokens / s["ttft"] if s["ttft"] > 0 else 0.0
        parts.append(f"prompt: {prompt_tokens} tokens, {rate:.1f} tok/s")
    parts.append(f"time to first token: {s['ttft'] * 1000:.1f} ms")
    parts.append(f"generation: {int(s['tokens'])} tokens, {decode:.1f} tok/s")
    if load_s is not None:
        parts.append(f"load: {load_s:.2f} s")
    return "timings: " + " | ".join(parts)


def _print_timings(
    s: dict[str, float], prompt_tokens: int | None = None, load_s: float | None = None
) -> None:
    print(timings_line(s, prompt_tokens, load_s), file=sys.stderr)


HELP = (
    "commands: /image PATH (attach an image to the next message; vision models), /clear (forget the\n"
    'conversation), /exit or /bye (quit), /help; a line of three quotes (""")\n'
    "starts and ends a multi-line message, a line ending in \\ continues on the next; Ctrl-C stops an answer,\n"
    "Ctrl-D quits"
)
COMMANDS = ("/clear", "/exit", "/quit", "/bye", "/help", "/?", "/image")


def _line_editing() -> None:
    """Arrow keys, editing and a history kept across sessions (readline), on a terminal only."""
    if not _stdin_is_terminal():
        return
    try:
        import atexit
        import os
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return
    path = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "spillover")
    hist = os.path.join(path, "chat_history")
    try:
        os.makedirs(path, exist_ok=True)
        if os.path.exists(hist):
            readline.read_history_file(hist)
    except OSError:
        return
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(hist)
        except OSError:
            pass

    atexit.register(save)


def read_message(read: Any) -> str:
    """One user message from `read(prompt)`: a line, lines joined by a trailing backslash, or a block
    between lines of three quotes. Raises EOFError at the end of input."""
    line = read(">>> ")
    if line.strip() == '"""' or (line.strip().startswith('"""') and not line.strip().endswith('"""')):
        parts = [line.strip()[3:]] if line.strip() != '"""' else []
        while True:
            more = read("... ")
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                return "\n".join(parts).strip("\n")
            parts.append(more)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read("... ")
    parts.append(line)
    return "\n".join(parts)


def _interactive(
    llm: Any, args: argparse.Namespace, model_defaults: dict | None = None, images: list[Any] | None = None
) -> int:
    from spillover.errors import SpilloverError
    from spillover.server.names import clean_model_name

    pending = list(images or [])  # images for the next user message (--image, /image PATH)
    params = sampling_from_args(args, 0.7, model_defaults)
    history: list[dict[str, str]] = []
    _line_editing()
    name = clean_model_name(llm.source) if hasattr(llm.source, "kind") else llm.source.name
    print(f"spillover chat with {name} on {llm.device_map.summary()}\n{HELP}", file=sys.stderr)
    while True:
        try:
            line = read_message(input)
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)", file=sys.stderr)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        word = cmd.split()[0] if cmd.startswith("/") else ""
        if word in ("/exit", "/quit", "/bye"):
            return 0
        if word == "/clear":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if word == "/image" and cmd[len(word) :].strip():
            try:
                pending += _read_images([cmd[len(word) :].strip()])
                print(f"(image attached to the next message: {len(pending)})", file=sys.stderr)
            except SpilloverError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if word:
            if word not in COMMANDS:
                print(f"unknown command {word}", file=sys.stderr)
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": _content(line, pending)})
        try:
            answer, interrupted, stats = _answer(llm, _with_system(args.system, history), params)
        except SpilloverError as e:  # e.g. an image sent to a text-only model: this turn is dropped
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        pending = []
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

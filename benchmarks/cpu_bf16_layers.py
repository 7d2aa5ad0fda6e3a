"""bf16 layers computed on the CPU at decode (what a spilled model's CPU layers run): torch's linear and SDPA
against the C GEMV (layers/cpu_gemv.c), the matmul decode attention (attention._cpu_decode_attention) and the C
decode attention over the paged cache (cpu_gemv.c `cpu_decode_attn`, the default), taking turns in one process on a 2-layer Llama-3-8B-shaped model with random weights (32000-token head).

    python benchmarks/cpu_bf16_layers.py [--threads N]

Prints a table of decode tok/s per context length: medians of 3 rounds.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from shapes import LLAMA3_8B  # noqa: E402

from spillover import LLM, SamplingParams  # noqa: E402
from spillover.layers import attention as A  # noqa: E402
from spillover.layers import cpu_linear as C  # noqa: E402
from spillover.loading.source import random_source  # noqa: E402


def sdpa_decode(q, k, v, mask, scale):  # noqa: ANN001, ANN201 - torch's CPU SDPA, as before
    return A._sdpa(q[:, :, None, :], k, v, mask, scale)[:, :, 0, :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="64,1024,4096")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(LLAMA3_8B, num_hidden_layers=2, vocab_size=32000)
    ctxs = [int(c) for c in args.contexts.split(",")]
    llm = LLM(random_source(cfg, "r"), dtype="bf16", progress=False, max_seq_len=max(ctxs) + 256)
    matmul, usable, c_attn = A._cpu_decode_attention, C.usable, C.decode_attention
    runs = (
        ("torch SDPA + torch linear", sdpa_decode, False),
        ("torch SDPA + C GEMV", sdpa_decode, True),
        ("matmul attention + C GEMV", matmul, True),
        ("C attention + C GEMV (default)", None, True),
    )
    got = collections.defaultdict(list)
    for ctx in ctxs:
        p = list(range(100, 100 + ctx))
        llm.generate(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        for r in range(3):
            for name, att, gemv in runs:
                A._cpu_decode_attention = att or matmul
                C.decode_attention = c_attn if att is None else (lambda *a: None)
                C.usable = usable if gemv else (lambda w, rows: False)
                sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
                o = llm.generate(p[::-1] if r % 2 else p, sp)
                got[(ctx, name)].append(o.metrics["decode_tok_per_s"])
    A._cpu_decode_attention, C.usable, C.decode_attention = matmul, usable, c_attn
    print(f"threads {torch.get_num_threads()}\n| context | run | decode tok/s |\n| --- | --- | ---: |")
    for (ctx, name), v in got.items():
        print(f"| {ctx} | {name} | {statistics.median(v):.2f} |")


if __name__ == "__main__":
    main()

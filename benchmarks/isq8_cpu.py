"""isq 8 on the CPU: the offsets' term inside the C Q8_0 GEMV (now) against the GEMV plus the term recomputed
in torch on every call (before), same weights, same run, taking turns; with `--rows` above 8 (a prompt), the
int16 GEMM of the blocks (now) against chunks dequantized to f32 for torch's GEMM (before).

    python benchmarks/isq8_cpu.py [--rows 1] [--reps 21] [--shapes smollm2,8b]

isq 8 keeps a CPU layer as GGUF Q8_0 blocks (d, q - 128) plus an f16 offset m per group of 32
(quant/isq.Int8Linear). Before, each decode call ran the block GEMV and then built (m + 128 d) in f32 [out, G]
and multiplied it with the group sums of x (`addmm`); now `gguf_gemv_q8_off` adds the term block by block while
it reads d. Matrices are cycled so that they come from memory, not the caches. Prints the median time per
projection set (one layer's four) for each, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from spillover.quant import gguf_kernels  # noqa: E402
from spillover.quant.formats import INT8_GROUP_SIZE  # noqa: E402
from spillover.quant.isq import Int8Linear  # noqa: E402

SHAPES = {  # a layer's projections (out, in)
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
    "8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
}


def before(q: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The path as it was: decode rows, the GEMV then the term in torch; prompts, chunks dequantized to f32
    into torch's GEMM (the int16 GEMM declined, as on a CPU without AVX512-VNNI)."""
    if len(x) > gguf_kernels.GEMV_ROWS:
        gemm = gguf_kernels.gemm
        gguf_kernels.gemm = lambda *a: False
        try:
            return q._blocks_mm(x)
        finally:
            gguf_kernels.gemm = gemm
    y = gguf_kernels.gemv(q.qweight, "q8_0", x)
    c = q._offset_term(0, q.out_features)  # [out, G]
    return y.addmm_(x.view(len(x), q.groups, INT8_GROUP_SIZE).sum(-1), c.T)


def now(q: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """Decode rows: `gguf_gemv_q8_off`; prompts: the int16 GEMM of the blocks plus the term, once."""
    return q._blocks_mm(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--layers", type=int, default=3, help="distinct layers cycled")
    ap.add_argument("--shapes", default="smollm2,8b")
    a = ap.parse_args()
    if gguf_kernels.library() is None:
        sys.exit("needs the C kernels (a C compiler)")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, {a.rows} row(s), medians of {a.reps}; load {os.getloadavg()}")
    print(
        "| shapes | before ms | now ms | now / before | max abs diff |\n| --- | ---: | ---: | ---: | ---: |"
    )
    for name in a.shapes.split(","):
        layers = []
        for _ in range(a.layers):
            mods = []
            for out, inp in SHAPES[name]:
                lin = nn.Linear(inp, out, bias=False)
                mods.append(Int8Linear(lin, on_cpu=True))
                del lin
            layers.append(mods)
        xs = {inp: torch.randn(a.rows, inp) for _, inp in SHAPES[name]}
        diff = max(
            (before(q, xs[q.in_features]) - now(q, xs[q.in_features])).abs().max().item() for q in layers[0]
        )
        times: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(a.reps):
            for label, fn in (("before", before), ("now", now)):
                t = time.perf_counter()
                for mods in layers:
                    for q in mods:
                        fn(q, xs[q.in_features])
                times[label].append((time.perf_counter() - t) / len(layers) * 1e3)
        b, n = statistics.median(times["before"]), statistics.median(times["now"])
        print(f"| {name} | {b:.3f} | {n:.3f} | {n / b:.2f} | {diff:.2e} |")


if __name__ == "__main__":
    main()

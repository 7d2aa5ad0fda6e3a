"""CPU GEMV per weight format: how fast torch's kernels read bf16, int8 and int4 (ISQ) weights for one row.

    python benchmarks/cpu_gemv.py [--k 4096] [--n 14336] [--mats 6]

`--mats` distinct matrices are cycled so that they do not stay in the CPU's caches (one int4 4096x14336 matrix
is 33 MB). The input is bf16 (what the int kernels take). Prints the time per GEMV, the GB/s of the bytes each
format holds, and weights per second: the cost model (placement/cost_model.py) assumes a CPU layer's decode
time is its bytes over the GEMV bandwidth, whatever the format.
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

from spillover.quant.isq import quantize_linear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--mats", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; {a.n} x {a.k} weights, {a.mats} matrices cycled")
    print("| format | ms per GEMV | GB/s of its bytes | Gweights/s |\n| --- | ---: | ---: | ---: |")
    for name, bits in (("bf16", None), ("int8", 8), ("int4", 4)):
        mods = []
        for _ in range(a.mats):
            m = nn.Linear(a.k, a.n, bias=False).to(torch.bfloat16)
            q = m if bits is None else quantize_linear(m, bits, on_cpu=True)
            if getattr(q, "dense", None) is not None:
                q.dense = None  # only the int4 kernel's layout (the dense copy serves prompts)
            mods.append(q)
        x = torch.randn(1, a.k, dtype=torch.bfloat16)
        with torch.inference_mode():
            for m in mods:
                m(x)
            times = []
            for _ in range(a.reps):
                t = time.perf_counter()
                for m in mods:
                    m(x)
                times.append((time.perf_counter() - t) / a.mats)
        t = statistics.median(times)
        nbytes = sum(p.numel() * p.element_size() for p in mods[0].parameters())
        print(f"| {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {a.k * a.n / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()

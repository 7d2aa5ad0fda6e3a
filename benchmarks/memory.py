"""Planner estimates against measured GPU memory, Llama-3-8B shape with random bf16 weights.

    python benchmarks/memory.py [--cases 1x4096,8x8192,1x32768] [--budget-case]

For each (batch x sequence length) the planner's reservation for cuda:0 is compared with what the run
really used: torch's peak allocated and reserved bytes (weights + KV + activations live there), and the
device-level use (total - free from cudaMemGetInfo, which also counts the CUDA context and library
workspaces: the plan's "other"). The workload fills the planned sizes: `batch` prompts of `seq - 8`
distinct random tokens, prefilled in chunks, then 8 decode steps each. PagedAttention is off so the KV pool
is exactly the planner's reservation (with it on, the pool grows to fill --pa-memory-fraction by design).

--budget-case: the case that breaks accelerate's planner: a 20 GiB GPU budget (enforced with
torch.cuda.set_per_process_memory_fraction and passed as --max-memory), batch 8 x 8192.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from shapes import LLAMA3_8B  # noqa: E402

# Llama-3.1-8B: the same shape with a 128k context (llama3 rope scaling), so 32k-token prompts are valid
LLAMA31_8B = dict(LLAMA3_8B, max_position_embeddings=131072, rope_scaling={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})  # fmt: skip

GIB = 1 << 30


def run_case(batch: int, seq: int, max_memory: dict | None = None, offload: str = "auto") -> dict:
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free0, total = torch.cuda.mem_get_info()
    kw = {"offload": offload} if offload != "auto" else {}
    llm = LLM(random_source(LLAMA31_8B, "llama3.1-8b-random"), dtype="bf16", max_seq_len=seq, max_batch_size=batch,
              paged_attention=False, max_memory=max_memory, progress=False, **kw)  # fmt: skip
    gen = torch.Generator().manual_seed(batch * 100000 + seq)
    prompts = [torch.randint(1000, 100000, (seq - 8,), generator=gen).tolist() for _ in range(batch)]
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    assert all(len(o.token_ids) == 8 for o in outs)
    free1, _ = torch.cuda.mem_get_info()
    row = next(r for r in llm.plan.rows if r.device == "cuda:0")
    res = {
        "case": f"{batch}x{seq}",
        "map": llm.device_map.summary(),
        "plan_torch": row.weight_bytes + row.kv_cache_bytes + row.activation_bytes,
        "plan_total": row.weight_bytes + row.kv_cache_bytes + row.activation_bytes + row.other_bytes,
        "plan_weights": row.weight_bytes,
        "plan_kv": row.kv_cache_bytes,
        "plan_act": row.activation_bytes,
        "plan_other": row.other_bytes,
        "peak_alloc": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "device_used": total - free1,
        "process_before": total - free0,
        "seconds": elapsed,
    }
    del llm, outs
    gc.collect()
    torch.cuda.empty_cache()
    return res


def show(rows: list[dict]) -> None:
    hdr = [
        "case",
        "plan w+kv+act",
        "peak allocated",
        "peak reserved",
        "plan total",
        "device used",
        "alloc/plan",
        "reserved/plan",
        "used/plan total",
        "run s",
    ]
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join([
            r["case"], f"{r['plan_torch'] / GIB:.2f}", f"{r['peak_alloc'] / GIB:.2f}", f"{r['peak_reserved'] / GIB:.2f}",
            f"{r['plan_total'] / GIB:.2f}", f"{r['device_used'] / GIB:.2f}", f"{r['peak_alloc'] / r['plan_torch']:.3f}",
            f"{r['peak_reserved'] / r['plan_torch']:.3f}", f"{r['device_used'] / r['plan_total']:.3f}", f"{r['seconds']:.1f}",
        ]))  # fmt: skip
    for r in rows:
        print(f"{r['case']}: weights {r['plan_weights'] / GIB:.2f} GiB, kv {r['plan_kv'] / GIB:.2f}, activations "
              f"{r['plan_act'] / GIB:.2f}, other {r['plan_other'] / GIB:.2f}; map: {r['map']}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="1x4096,8x8192,1x32768")
    ap.add_argument("--budget-case", action="store_true")
    ap.add_argument("--offload", default="auto")
    args = ap.parse_args()
    rows = []
    if args.cases:
        for c in args.cases.split(","):
            b, s = (int(x) for x in c.split("x"))
            rows.append(run_case(b, s))
            show(rows[-1:])
    if args.budget_case:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(20 * GIB / total)
        rows.append(run_case(8, 8192, {"cuda:0": "20GiB"}, args.offload))
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    show(rows)


if __name__ == "__main__":
    main()

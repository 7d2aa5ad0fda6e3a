"""ISQ side by side on one GPU: bf16 vs --isq 8 vs --isq 4, Llama-3-8B shape, random weights, one run.

    python benchmarks/quant.py [--new 128] [--skip-spill | --spill-only] [--layers 32]
    python benchmarks/quant.py --llama70b     # the documented example: 70B shape, --isq 4, cuda:0=24GiB

Rows: decode batch 1 (128-token prompt, `--new` tokens, after warm-up: CUDA graphs captured), prefill of 2048
tokens (best of 3 fresh prompts), the GPU memory torch allocated at the peak vs the plan's GPU total, and
`--isq 4 --max-memory cuda:0=4GiB` with that budget enforced by `torch.cuda.set_per_process_memory_fraction`.
Random weights are drawn on the GPU per tensor (then moved where the map puts them), never zeros.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from shapes import LLAMA3_8B, LLAMA31_70B  # noqa: E402

GiB = 1 << 30


def cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench(cfg: dict, isq: int | None, budget: float | None, new: int, prefill: bool, **extra: object) -> dict:
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    res: dict = {}
    total = torch.cuda.get_device_properties(0).total_memory
    if budget:
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * GiB / total), 0)
    t = time.perf_counter()
    kw = {"max_memory": {"cuda:0": f"{budget}GiB"}, **extra} if budget else dict(extra)
    try:
        llm = LLM(
            random_source(cfg, f"llama-{cfg['num_hidden_layers']}l-random", draw_on="cuda"),
            dtype="bf16",
            isq=isq,
            progress=False,
            **kw,
        )
        torch.cuda.synchronize()
        res["load_s"] = time.perf_counter() - t
        res["map"] = llm.device_map.summary()
        res["plan_gpu_gib"] = sum(r.total_bytes for r in llm.plan.rows if r.device.startswith("cuda")) / GiB
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(1000, 100000, (128,), generator=gen).tolist()
        greedy = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up, graphs
        out = [llm.generate(prompt, greedy) for _ in range(2)][-1]
        res["decode_tok_s"] = out.metrics["decode_tok_per_s"]
        res["tokens"] = list(out.token_ids[:16])
        if prefill:
            one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            llm.generate(torch.randint(1000, 100000, (2048,), generator=gen).tolist(), one)
            ts = []
            for _ in range(3):
                p = torch.randint(1000, 100000, (2048,), generator=gen).tolist()
                torch.cuda.synchronize()
                t = time.perf_counter()
                llm.generate(p, one)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            res["prefill_2048_s"] = min(ts)
        res["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
        res["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        del llm, out
    except Exception as e:  # noqa: BLE001  (a crash is a result here: it goes in the table)
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    cleanup()
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--skip-spill", action="store_true")
    ap.add_argument("--spill-only", action="store_true", help="only the isq 4 rows under a 4 GiB budget")
    ap.add_argument(
        "--llama70b", action="store_true",
        help="only the documented example: Llama-3.1-70B shape, isq 4, cuda:0=24GiB, 4096 x 2 (16 new tokens)",
    )  # fmt: skip
    ap.add_argument(
        "--spill-offload", default="auto", help="offload modes of the 4 GiB rows (comma-separated)"
    )
    ap.add_argument(
        "--tune", nargs="?", const="w4,w8", default=None,
        help="sweep the GEMV tilings first (quant_kernels.tune): w4,w8 (default) or one of them",
    )  # fmt: skip
    ap.add_argument(
        "--tilings", default=None,
        help="GEMV tilings from a JSON file with 'w4' and 'w8' tables (benchmarks/quant_kernels.py --out)",
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    runs: dict[str, dict] = {}
    if args.tune:
        from quant_kernels import tune

        from spillover.quant import kernels

        w4, w8, times = tune(kinds=args.tune)
        kernels.W4_CFGS.update(w4)
        kernels.W8_CFGS.update(w8)
        print(f"tuned tilings: int4 {w4}, int8 {w8}", flush=True)
        runs["tuning"] = {"w4": w4, "w8": w8, "us": times}
    if args.tilings:
        from spillover.quant import kernels

        with open(args.tilings) as f:
            t = json.load(f)
        kernels.W4_CFGS.update({k: tuple(v) for k, v in t["w4"].items()})
        kernels.W8_CFGS.update({k: tuple(v) for k, v in t["w8"].items()})
        print(f"tilings: int4 {kernels.W4_CFGS}, int8 {kernels.W8_CFGS}", flush=True)
        runs["tuning"] = {"w4": kernels.W4_CFGS, "w8": kernels.W8_CFGS}
    if args.llama70b:
        name = "70B isq 4, cuda:0=24GiB, 4096x2"
        runs[name] = bench(LLAMA31_70B, 4, 24.0, 16, prefill=False, max_seq_len=4096, max_batch_size=2)
        print("70b", json.dumps(runs[name]), flush=True)
    for name, isq in (("bf16", None), ("isq 8", 8), ("isq 4", 4)):
        if args.spill_only or args.llama70b:
            break
        runs[name] = bench(cfg, isq, None, args.new, prefill=True)
        print(name, json.dumps(runs[name]), flush=True)
    if not (args.skip_spill or args.llama70b):
        for off in args.spill_offload.split(","):
            name = f"isq 4, cuda:0=4GiB, offload {off}"
            runs[name] = bench(cfg, 4, 4.0, 32, prefill=False, pa_context_len=4096, offload=off)
            print("spill", json.dumps(runs[name]), flush=True)
    b = runs.get("bf16", {})
    print(
        f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {'Llama-3.1-70B' if args.llama70b else 'Llama-3-8B'} shape"
    )
    print(
        "| run | decode tok/s, batch 1 | vs bf16 | prefill 2048 s | vs bf16 time | GPU peak alloc / plan GiB | map |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, r in runs.items():
        if n == "tuning":
            continue
        if "error" in r:
            print(f"| {n} | error: {r['error'][:120]} | | | | | |")
            continue
        d = r["decode_tok_s"]
        rel = f"{d / b['decode_tok_s']:.2f}x" if "decode_tok_s" in b else "-"
        p = r.get("prefill_2048_s")
        prel = f"{p / b['prefill_2048_s']:.2f}x" if p and "prefill_2048_s" in b else "-"
        mem = f"{r['gpu_peak_alloc_gib']:.2f} / {r['plan_gpu_gib']:.2f}"
        print(f"| {n} | {d:.1f} | {rel} | {p and f'{p:.4f}' or '-'} | {prel} | {mem} | {r['map']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()

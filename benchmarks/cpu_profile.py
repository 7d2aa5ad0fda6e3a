"""Where a CPU decode step goes, and this CPU's roofline (benchmarks/NOTES-cpu.md has the findings).

    python benchmarks/cpu_profile.py [--dtype auto] [--isq 4] [--threads 2] [--steps 64] [--roofline]

- profile: SmolLM2-135M GGUF, an 8-token prompt then `--steps` decode steps under torch.profiler; per-op self
  time per step, the step's wall time without the profiler (median), the weight bytes a step reads and the
  bandwidth that implies, and the time outside the big kernels (Python, dispatch, small ops).
- roofline (`--roofline`): memory bandwidth (a 256 MiB sum = read only, a 64 MiB copy = read + write, an f32
  GEMV) and peak FLOP/s (f32 and bf16 GEMM 1024^3). Best of 7 (the machine is shared: minima are the
  least disturbed figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

BIG = ("aten::mm", "aten::addmm", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm")


def best(fn, reps: int = 7, inner: int = 3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t) / inner)
    return min(ts)


def roofline() -> None:
    a = torch.ones(64 << 20)  # 256 MiB f32
    t = best(lambda: a.sum())
    print(f"read (sum of 256 MiB f32):      {a.nbytes / t / 2**30:6.1f} GiB/s")
    b, c = torch.ones(16 << 20), torch.empty(16 << 20)  # 64 MiB each
    t = best(lambda: c.copy_(b))
    print(f"copy 64 MiB (read + write):     {2 * b.nbytes / t / 2**30:6.1f} GiB/s")
    w, v = torch.ones(16384, 4096), torch.ones(4096)  # 256 MiB f32
    t = best(lambda: torch.mv(w, v))
    print(f"f32 GEMV 16384x4096 (256 MiB):  {w.nbytes / t / 2**30:6.1f} GiB/s")
    for dt in (torch.float32, torch.bfloat16):
        x, y = torch.ones(1024, 1024, dtype=dt), torch.ones(1024, 1024, dtype=dt)
        t = best(lambda x=x, y=y: x @ y)
        print(f"{str(dt)[6:]:>8} GEMM 1024^3:          {2 * 1024**3 / t / 1e9:6.0f} GFLOP/s")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter once (the tied embedding/head counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.nbytes
    return n


def profile(args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    from spillover import LLM, SamplingParams

    llm = LLM(dtype=args.dtype, isq=args.isq, progress=False)
    prompt = list(range(100, 108))
    sp = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def gen(p):
        t = time.perf_counter()
        llm.generate(p, one)
        t1 = time.perf_counter()
        llm.generate([p[0] + 1000, *p[1:]], sp)
        return (time.perf_counter() - t1 - (t1 - t)) / args.steps

    gen(prompt)
    step = statistics.median(gen([101 + i, *prompt[1:]]) for i in range(5))
    with prof(activities=[ProfilerActivity.CPU]) as p:
        llm.generate([99, *prompt[1:]], sp)
    rows = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / args.steps
    print(
        f"--dtype {args.dtype} (computes in {llm.plan.params['dtype']}) isq={args.isq}, {torch.get_num_threads()} threads"
    )
    print(
        f"decode step (no profiler, median of 5 x {args.steps}): {step * 1e3:.2f} ms = {1 / step:.1f} tok/s"
    )
    wb = weight_bytes(llm.model)
    print(f"weights read per step: {wb / 2**20:.1f} MiB -> {wb / step / 2**30:.1f} GiB/s at that step time")
    print(f"profiled self time per step: {total / 1e3:.2f} ms (the profiler adds its own overhead)")
    big = sum(e.self_cpu_time_total for e in rows if e.key in BIG) / args.steps
    print(f"  in weight matmuls ({', '.join(k[6:] for k in BIG)}): {big / 1e3:.2f} ms")
    print(f"  everything else (small ops, dispatch): {(total - big) / 1e3:.2f} ms")
    print(f"{'op':<48} {'us/step':>9} {'calls/step':>10}")
    for e in rows[: args.top]:
        print(f"{e.key[:48]:<48} {e.self_cpu_time_total / args.steps:9.1f} {e.count / args.steps:10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--isq", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--roofline", action="store_true", help="measure bandwidth and FLOP/s instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roofline() if args.roofline else profile(args)


if __name__ == "__main__":
    main()

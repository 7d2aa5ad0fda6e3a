"""Proof that every budget holds on a GPU: each grid point in its own process, limited to its budget.

    python benchmarks/fit_grid.py [--grid default|smoke] [--isq] [--parallel 3] [--out DIR] [--only REGEX]
        [--exclude REGEX] [--first REGEX] [--deadline S] [--diagnose]
    python benchmarks/fit_grid.py --point '{"quant": "bf16", "budget": 8, "seq": 8192, "batch": 8, ...}'

Each point is a child process that limits torch to its budget with
`torch.cuda.set_per_process_memory_fraction(budget / total)`, loads a Llama-3.1-8B-shaped model with random
weights (drawn on the device each tensor goes to, `loading.source.random_source`; ISQ points draw on the GPU,
`random_source(..., draw_on="cuda")`) with
`max_memory={"cuda:0": budget}`, then runs the planned worst case: `max_batch_size` prompts of
`max_seq_len - DECODE` random tokens each, decoding DECODE tokens to the end of the context.

Per point: the plan's cuda:0 row (weights + KV + activations + other), the KV pool really allocated (paged
pools grow past the plan's reservation to `--pa-memory-fraction` of the budget), and the measured peak
device use = torch's peak reserved bytes + the memory outside torch's allocator (CUDA context and loaded
kernel modules). The latter is read as (total - free) - reserved at the end of a point that ran alone on the
GPU (the first, solo point); points that run side by side cannot read it apart from each other, so they add
that solo figure (`nontorch` in the JSON says which). Results: a point the plan accepts must finish with no
OOM and a peak within the budget; the target is "planned use" (plan row total, plus the pool's growth past
the plan's KV reservation) <= 1.10 x peak. A point the plan refuses must be refused before any weight is
loaded, with the shortfall. Peaks are the run's (prompts and decode), measured after loading: random weights
are drawn on the GPU even for CPU-resident layers (a real checkpoint's CPU weights never touch it), so the
loading peaks (`load_peak_*` in the JSON) are the benchmark's own.

Points run side by side (`--parallel`) while the sum of their budgets fits `--gpu-gib`, the sum of their plans'
CPU rows (planned here, without torch, plus `--process-gib` each) fits `--host-gib` (default 80% of RAM), and at
most `--cpu-heavy` of them compute layers on the CPU, each with its share of the cores (OMP_NUM_THREADS), in grid
order: in run 8, six 8B spills side by side ran the 128 GiB host out of memory.

Also the SDK's first request against steady state (solo, no budget): decode tok/s of the first `generate`
after `LLM()` (decode graphs are captured at load) and the median of the next three.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

sys.path.insert(0, os.path.dirname(__file__))

from shapes import LLAMA31_8B, LLAMA31_70B  # noqa: E402

GIB = 1 << 30
DECODE = 16


def grid(name: str, isq: bool) -> list[dict]:
    """The points, solo ones first. `isq`: add ISQ 8/4 points (ISQ on CUDA is being rewritten: issue 21)."""
    pts: list[dict] = [{"kind": "speed", "quant": "bf16", "budget": None, "seq": 4096, "batch": 1}]
    if name == "smoke":
        return pts + [
            {"quant": "bf16", "budget": 20, "seq": 8192, "batch": 8, "paged": True, "offload": "auto"},
            {"quant": "bf16", "budget": 8, "seq": 4096, "batch": 1, "paged": True, "offload": "stream"},
        ]
    quants = ["bf16"] + (["isq8", "isq4"] if isq else [])
    for q in quants:  # the grid: budgets x (max_seq_len, max_batch_size) x paged on/off, offload auto
        for budget in (40, 20, 12, 8, 4):
            for seq, batch in ((4096, 1), (8192, 8), (32768, 1)):
                for paged in (True, False):
                    pts.append({"quant": q, "budget": budget, "seq": seq, "batch": batch, "paged": paged,
                                "offload": "auto"})  # fmt: skip
    for off in ("cpu", "stream"):
        pts.append({"quant": "bf16", "budget": 8, "seq": 4096, "batch": 1, "paged": True, "offload": off})
    if isq:  # the 70B shape with isq 4 (its bf16 weights fit neither the disk nor the RAM of the box)
        for budget in (40, 24):
            for seq, batch in ((4096, 1), (8192, 8)):
                pts.append({"model": "70b", "quant": "isq4", "budget": budget, "seq": seq, "batch": batch,
                            "paged": True, "offload": "auto"})  # fmt: skip
    return pts


def label(p: dict) -> str:
    if p.get("kind") == "speed":
        return f"{p['quant']} full GPU {p['seq']}x{p['batch']} first request"
    paged = "paged" if p["paged"] else "no-paged"
    model = "70B " if p.get("model") == "70b" else ""
    return f"{model}{p['quant']} {p['budget']}GiB {p['seq']}x{p['batch']} {paged} offload={p['offload']}"


# ---------------------------------------------------------------------------------------------- child


def live_at_oom(trace: list[dict], top: int = 12) -> list[str]:
    """Replay one device's memory-history trace (`torch.cuda.memory._snapshot()["device_traces"][0]`) to its
    first OOM and group the blocks alive then by the spillover lines that allocated them: "MiB count site",
    largest first. Empty when the trace holds no OOM."""
    live: dict[int, tuple[int, str]] = {}
    for e in trace:
        if e["action"] == "alloc":
            frames = [
                f
                for f in e.get("frames", [])
                if "spillover" in f["filename"] or "benchmarks" in f["filename"]
            ]
            site = " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}" for f in frames[:3]) or "?"
            live[e["addr"]] = (e["size"], site)
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
        elif e["action"] == "oom":
            sizes: dict[str, list[int]] = {}
            for size, site in live.values():
                sizes.setdefault(site, []).append(size)
            rows = sorted(sizes.items(), key=lambda kv: -sum(kv[1]))[:top]
            return [f"{sum(v) / (1 << 20):.0f} MiB {len(v)}x {k}" for k, v in rows]
    return []


def run_point(p: dict) -> dict:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if p["budget"]:
        torch.cuda.set_per_process_memory_fraction(p["budget"] * GIB / total)
    torch.cuda.init()
    if p.get("diagnose"):  # the allocations' Python lines, to say what was alive at an OOM
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    def oom(result: str, e: BaseException) -> dict:
        r = {"result": result, "reason": str(e).splitlines()[0][:300]}
        if p.get("diagnose"):
            r["live_at_oom"] = live_at_oom(torch.cuda.memory._snapshot()["device_traces"][0])
        return r

    from spillover import LLM, SamplingParams
    from spillover.errors import PlacementError
    from spillover.loading.source import random_source

    isq = {"bf16": None, "isq8": 8, "isq4": 4}[p["quant"]]
    kw = dict(dtype="bf16", max_seq_len=p["seq"], max_batch_size=p["batch"], isq=isq, progress=False)
    if p["budget"]:
        kw |= dict(
            max_memory={"cuda:0": f"{p['budget']}GiB"}, paged_attention=p["paged"], offload=p["offload"]
        )
    out: dict = {"point": label(p), **p}
    t = time.perf_counter()
    try:
        # drawn on the GPU, then moved where the map puts them: CPU draws of 8B weights took minutes
        shape = LLAMA31_70B if p.get("model") == "70b" else LLAMA31_8B
        src = random_source(shape, f"llama3.1-{p.get('model', '8b')}-random", draw_on="cuda")
        llm = LLM(src, **kw)
    except PlacementError as e:
        out |= {"result": "refused", "reason": str(e).splitlines()[0],
                "allocated_at_refusal": torch.cuda.memory_allocated()}  # fmt: skip
        return out
    except torch.OutOfMemoryError as e:
        return out | oom("OOM at load", e)
    except Exception as e:  # noqa: BLE001 - every failure is a grid result
        return out | {"result": f"error at load: {type(e).__name__}", "reason": str(e).splitlines()[0][:300]}
    print(
        f"loaded in {time.perf_counter() - t:.1f} s: {llm.device_map.summary()}", file=sys.stderr, flush=True
    )
    out |= {"load_s": time.perf_counter() - t, "graphs": llm.graphs_captured,
            "graph_capture_s": llm.graph_capture_seconds, "map": llm.device_map.summary()}  # fmt: skip
    row = llm.plan.row("cuda:0")
    blocks = llm.engine.scheduler.blocks
    pool_tokens = blocks.num_blocks * blocks.block_size
    # K and V, 8 kv heads of 128, bf16, per layer on the GPU (both shapes)
    per_token = 2 * 8 * 128 * 2 * sum(1 for d in llm.device_map.layers if d == "cuda:0")
    out |= {"plan": row.total_bytes, "plan_weights": row.weight_bytes, "plan_kv": row.kv_cache_bytes,
            "plan_act": row.activation_bytes, "plan_other": row.other_bytes, "pool_tokens": pool_tokens,
            "pool_kv": pool_tokens * per_token, "after_load_reserved": torch.cuda.memory_reserved(),
            "load_peak_reserved": torch.cuda.max_memory_reserved(),
            "load_peak_allocated": torch.cuda.max_memory_allocated()}  # fmt: skip
    # The random weights of CPU-resident layers are drawn on the GPU and moved (a real checkpoint's never
    # touch it), so loading peaks are the benchmark's; the run's peaks are measured from here (the cached
    # blocks loading left stay reserved and count).
    torch.cuda.reset_peak_memory_stats()
    out["planned_use"] = row.total_bytes + max(0, out["pool_kv"] - row.kv_cache_bytes)
    try:
        if p.get("kind") == "speed":
            out |= speed(llm)
        else:
            gen = torch.Generator().manual_seed(p["seq"] * 10 + p["batch"])
            n = p["seq"] - DECODE
            prompts = [torch.randint(1000, 100000, (n,), generator=gen).tolist() for _ in range(p["batch"])]
            t = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(max_tokens=DECODE, temperature=0, ignore_eos=True))
            torch.cuda.synchronize()
            out["run_s"] = time.perf_counter() - t
            # where the run's time went: the last prompt's first token ends the prefills, then decode
            out["prefill_s"] = max(o.metrics["time_to_first_token_s"] for o in outs)
            out["decode_tok_s"] = statistics.median(o.metrics["decode_tok_per_s"] for o in outs)
            out["offload_steps"] = dict(llm.offload.steps) if llm.offload is not None else None
            assert all(len(o.token_ids) == DECODE for o in outs), "a sequence stopped early"
        out["result"] = "ok"
    except torch.OutOfMemoryError as e:
        out |= oom("OOM in run", e)
    except Exception as e:  # noqa: BLE001
        out |= {"result": f"error in run: {type(e).__name__}", "reason": str(e).splitlines()[0][:300]}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    out |= {"peak_reserved": torch.cuda.max_memory_reserved(), "peak_allocated": torch.cuda.max_memory_allocated(),
            "end_reserved": torch.cuda.memory_reserved(), "end_used": total - free}  # fmt: skip
    return out


def speed(llm) -> dict:  # noqa: ANN001
    """Decode tok/s of the first request after LLM() and the median of the next three (128-token prompt)."""
    import torch

    from spillover import SamplingParams

    prompt = torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(1)).tolist()
    sp = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    rates = [llm.generate(prompt, sp).metrics["decode_tok_per_s"] for _ in range(4)]
    return {"first_tok_s": rates[0], "steady_tok_s": statistics.median(rates[1:]), "rates": rates}


# ---------------------------------------------------------------------------------------------- parent


def spawn(p: dict, timeout: float, threads: int = 0) -> dict:
    """Run point `p` in a child process; `threads`: its CPU threads (0: all)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(p)]
    if p.get("model") == "70b":  # drawing and quantizing 70 G weights alone took 215 s (RESULTS-quant.md)
        timeout *= 2
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:  # where it was: the child's last lines on stderr
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        tail = " | ".join(err.strip().splitlines()[-2:])[:300]
        return {"point": label(p), **p, "result": f"timeout ({timeout:.0f} s)"} | (
            {"reason": tail} if tail else {}
        )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {
            "point": label(p),
            **p,
            "result": f"crashed (rc {r.returncode})",
            "reason": " | ".join(tail)[:400],
        }
    res = json.loads(lines[-1][7:])
    res["wall_s"] = time.perf_counter() - t
    return res


def host_need(p: dict, gpu_bytes: int, cpu_bytes: int) -> tuple[int, bool]:
    """(CPU memory the point's plan puts on the host, whether layers are computed on the CPU), planned here
    without torch: points that spill are scheduled so that their host memory and CPU threads are not
    oversubscribed (six 8B spills side by side exhausted the 128 GiB host in run 8)."""
    from spillover.config import AutoDeviceMapParams
    from spillover.loading.source import random_source
    from spillover.placement.inventory import hypothetical_inventory
    from spillover.placement.resolve import plan_for_source

    if p["budget"] is None:
        return 0, False
    shape = LLAMA31_70B if p.get("model") == "70b" else LLAMA31_8B
    isq = {"bf16": None, "isq8": 8, "isq4": 4}[p["quant"]]
    plan = plan_for_source(
        random_source(shape), AutoDeviceMapParams(max_seq_len=p["seq"], max_batch_size=p["batch"]), dtype="bf16",
        max_memory={"cuda:0": f"{p['budget']}GiB"}, isq=isq, paged=p["paged"], offload=p["offload"],
        inventory=hypothetical_inventory([gpu_bytes], cpu_bytes),
    )  # fmt: skip
    cpu = plan.row("cpu")
    return cpu.total_bytes, bool(cpu.layers)  # (the CPU row's layers run there; streamed ones on the GPU)


def judge(r: dict, nontorch: int) -> dict:
    """Peak device use and the verdict of one point."""
    if "peak_reserved" in r:
        own = r.get("solo") and r["end_used"] - r["end_reserved"]
        r["nontorch"] = own if own else nontorch
        r["nontorch_source"] = "own" if own else "solo point"
        r["peak"] = r["peak_reserved"] + r["nontorch"]
        r["ratio"] = r["planned_use"] / r["peak"]
        budget = (r["budget"] or 0) * GIB
        load_peak = r.get("load_peak_reserved", 0) + r["nontorch"]  # loading too stays inside the budget
        r["within_budget"] = not budget or max(r["peak"], load_peak) <= budget
    return r


def table(rows: list[dict]) -> str:
    hdr = "| point | plan GiB | planned use GiB | peak GiB | planned/peak | result | map | pool tokens | graphs (s) "
    hdr += "| load / prefill / run s |"
    out = [hdr, "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |"]
    for r in rows:
        res = r["result"]
        if res == "ok" and r.get("budget"):
            worst = max(r["peak"], r.get("load_peak_reserved", 0) + r["nontorch"])
            res = "ok" if r["within_budget"] else f"**over budget** ({worst / GIB:.2f} > {r['budget']})"
        if r.get("reason"):
            res += f": {r['reason']}"
        g = lambda k, r=r: f"{r[k] / GIB:.2f}" if k in r else ""  # noqa: E731
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        graphs = f"{r['graphs']} ({r['graph_capture_s']:.1f})" if "graphs" in r else ""
        times = " / ".join(f"{r[k]:.1f}" if k in r else "-" for k in ("load_s", "prefill_s", "run_s"))
        out.append(f"| {r['point']} | {g('plan')} | {g('planned_use')} | {g('peak')} | {ratio} | {res} | "
                   f"{r.get('map', '')} | {r.get('pool_tokens', '')} | {graphs} | {times} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", help="run one point (JSON) in this process and print its RESULT line")
    ap.add_argument("--grid", default="default", choices=["default", "smoke"])
    ap.add_argument("--isq", action="store_true", help="add ISQ 8/4 points")
    ap.add_argument("--parallel", type=int, default=3, help="points run side by side (budgets <= --gpu-gib)")
    ap.add_argument("--gpu-gib", type=float, default=120.0, help="sum of budgets of points run side by side")
    ap.add_argument(
        "--host-gib", type=float, default=0.0,
        help="sum of the host memory (plan's CPU row + --process-gib) of points run side by side; 0: 80%% of RAM",
    )  # fmt: skip
    ap.add_argument(
        "--process-gib", type=float, default=3.0, help="host memory of a CUDA process besides its plan"
    )
    ap.add_argument(
        "--cpu-heavy", type=int, default=2, help="points computing layers on the CPU run side by side"
    )
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per point (twice that for 70B)")
    ap.add_argument("--only", default="", help="run only points whose label matches this regular expression")
    ap.add_argument("--exclude", default="", help="skip points whose label matches this regular expression")
    ap.add_argument(
        "--solo", action="store_true", help="run every point alone (each reads its own non-torch use)"
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for fit_grid.json and .md")
    ap.add_argument(
        "--diagnose", action="store_true",
        help="record allocations (torch's memory history): an OOM's result lists what was alive, by source line",
    )  # fmt: skip
    ap.add_argument("--first", default="", help="start points whose label matches this first (the long ones)")
    ap.add_argument(
        "--deadline", type=float, default=0.0,
        help="seconds: start no point after this (the rest are listed as not run); 0 = none",
    )  # fmt: skip
    ap.add_argument(
        "--nontorch-gib", type=float, default=0.0,
        help="memory outside torch per process when no solo point runs (H200, torch 2.11: 0.74 measured)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.point:
        print("RESULT " + json.dumps(run_point(json.loads(args.point))), flush=True)
        return
    pts = [
        p for p in grid(args.grid, args.isq)
        if re.search(args.only, label(p)) and not (args.exclude and re.search(args.exclude, label(p)))
    ]  # fmt: skip
    if args.diagnose:
        pts = [p | {"diagnose": True} for p in pts]
    if args.first:
        pts.sort(key=lambda p: not re.search(args.first, label(p)))  # stable: the grid's order otherwise
    t0 = time.perf_counter()
    results: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "fit_grid.jsonl")  # each point as it ends: a call cut short keeps them

    def record(r: dict) -> dict:
        print(json.dumps(r), flush=True)
        with lock, open(log_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        return r

    def late(p: dict) -> dict | None:
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            return {"point": label(p), **p, "result": "not run (deadline)"}
        return None

    solo = [p for p in pts if args.solo or p.get("kind") == "speed" or p["budget"] is None]
    rest = [p for p in pts if p not in solo]
    import psutil

    ram = psutil.virtual_memory().total
    host_cap = args.host_gib * GIB or 0.8 * ram
    cores = os.cpu_count() or 1
    needs = {label(p): host_need(p, 141 * GIB, ram) for p in rest}
    lock, used, host, heavy = Lock(), [0.0], [0.0], [0]
    queue = [label(p) for p in rest if needs[label(p)][1]]  # points computing on the CPU start in grid order
    for p in solo:  # alone on the GPU: its speed figures and its non-torch memory are its own
        results.append(record(late(p) or spawn(p, args.timeout) | {"solo": True}))

    def one(p: dict) -> dict:
        need, cpu = needs[label(p)]
        need += args.process_gib * GIB
        while True:
            if skipped := late(p):
                with lock:
                    if label(p) in queue:
                        queue.remove(label(p))
                return record(skipped)
            with lock:
                gpu_ok = used[0] + p["budget"] <= args.gpu_gib or used[0] == 0
                host_ok = host[0] + need <= host_cap or host[0] == 0
                turn = not cpu or (heavy[0] < args.cpu_heavy and queue[0] == label(p))
                if gpu_ok and host_ok and turn:
                    used[0], host[0], heavy[0] = used[0] + p["budget"], host[0] + need, heavy[0] + cpu
                    if cpu:
                        queue.pop(0)
                    break
            time.sleep(0.5)
        try:  # a point computing layers on the CPU gets its share of the cores
            r = spawn(p, args.timeout, max(1, cores // args.cpu_heavy) if cpu else 0)
        finally:
            with lock:
                used[0], host[0], heavy[0] = used[0] - p["budget"], host[0] - need, heavy[0] - cpu
        return record(r | {"host_plan": needs[label(p)][0]})

    with ThreadPoolExecutor(max(1, args.parallel)) as ex:
        results += list(ex.map(one, rest))
    solo_nontorch = next(
        (r["end_used"] - r["end_reserved"] for r in results if r.get("solo") and "end_used" in r),
        int(args.nontorch_gib * GIB),
    )
    rows = [judge(r, solo_nontorch) for r in results]
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    head = (f"{dev}, torch {torch.__version__}; {len(rows)} points in {time.perf_counter() - t0:.0f} s, "
            f"{args.parallel} side by side; memory outside torch's allocator (solo point): "
            f"{solo_nontorch / GIB:.2f} GiB")  # fmt: skip
    md = head + "\n\n" + table(rows)
    for r in rows:
        if r.get("live_at_oom"):
            md += f"\n\nAlive at the OOM of {r['point']}:\n" + "\n".join(f"- {ln}" for ln in r["live_at_oom"])
    speed_rows = [r for r in rows if r.get("kind") == "speed" and "first_tok_s" in r]
    for r in speed_rows:
        md += (f"\n\nSDK first request: {r['first_tok_s']:.1f} tok/s decode vs {r['steady_tok_s']:.1f} steady "
               f"({r['first_tok_s'] / r['steady_tok_s']:.3f}); {r['graphs']} decode graphs captured at load in "
               f"{r['graph_capture_s']:.2f} s")  # fmt: skip
    print("\n" + md)
    with open(os.path.join(args.out, "fit_grid.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "fit_grid.md"), "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()

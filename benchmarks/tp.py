"""Tensor parallelism on several GPUs: issue 18's table, every row against its single-GPU peer in the same run.

    python benchmarks/tp.py --dry-run                       # the plans only: runs anywhere, loads nothing
    python benchmarks/tp.py --json $OUT/tp.json             # on a 2-GPU machine (the 70B row needs 4 GPUs)
    python benchmarks/tp.py --rows decode8b,nonccl          # a subset

Rows (each measurement in its own process: one tensor-parallel engine per process, and the 1-GPU peer runs
with CUDA_VISIBLE_DEVICES=0 so that it plans one GPU):
| row        | measure                                                          | target              |
| decode8b   | Llama-3-8B shape bf16, decode batch 1, TP=2 vs 1 GPU              | >= 1.6x             |
| decode70b  | Llama-3.1-70B shape bf16, decode batch 1, TP=4 (needs 4 GPUs)     | >= 60 tok/s         |
| serve8b    | 8B, 64 concurrent streams through `serve`, TP=2 vs 1 GPU (output) | >= 1.7x             |
| nonccl     | 2 GPUs and SPILLOVER_NO_NCCL=1: layer map, same tokens as TP=2    | layer map, equal    |

Decode rows use random weights made on each rank's GPU (speed does not depend on their values); the serve
row runs benchmarks/serve.py (random 8B checkpoint on disk); the nonccl row writes a small f32 checkpoint so
both runs read the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shapes import LLAMA3_8B

HERE = Path(__file__).resolve().parent
LLAMA31_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "max_position_embeddings": 131072}  # fmt: skip
SMALL = {**LLAMA3_8B, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000}  # fmt: skip
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA31_70B, "small": SMALL}
ROWS = ("decode8b", "decode70b", "serve8b", "nonccl")


# ------------------------------------------------------------------------------ children (one engine each)


def child_decode(shape: str, tp: int | None, tokens: int, repeats: int) -> dict:
    import torch

    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    llm = LLM(random_source(SHAPES[shape], f"random-{shape}"), dtype="bf16", max_seq_len=1024, progress=False,
              tensor_parallel_size=tp)  # fmt: skip
    prompt = torch.randint(3, 30000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    warm = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    llm.generate(prompt, warm)
    llm.generate(prompt, warm)
    rates = []
    for _ in range(repeats):
        out = llm.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        rates.append(out.metrics["decode_tok_per_s"])
    llm.close()
    return {"tp": llm.plan.tensor_parallel, "tok_s": statistics.median(rates), "runs": rates}


def child_tokens(path: str, tp: int | None) -> dict:
    from spillover import LLM, SamplingParams

    llm = LLM(path, dtype="f32", max_seq_len=1024, progress=False, tensor_parallel_size=tp)
    out = llm.generate(list(range(100, 164)), SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
    llm.close()
    return {"tp": llm.plan.tensor_parallel, "map": llm.device_map.summary(), "tokens": out.token_ids}


def run_child(args: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    t = time.perf_counter()
    p = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        return {
            "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"],
            "seconds": time.perf_counter() - t,
        }
    return json.loads(p.stdout.strip().splitlines()[-1])


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


# ------------------------------------------------------------------------------ rows


def row_decode(shape: str, tp: int, target: str, args, peer: bool = True) -> dict:
    vs = " vs 1 GPU" if peer else ""
    r = {"row": f"decode{shape}", "measure": f"{shape} bf16 decode batch 1, TP={tp}{vs}", "target": target}
    if gpu_count() < tp:
        return {**r, "result": f"not run: needs {tp} GPUs, {gpu_count()} visible"}
    par = run_child(["decode", shape, str(tp), str(args.tokens), str(args.repeats)])
    if not peer:  # a 70B in bf16 does not fit one GPU: the target is absolute
        res = f"error: {par['error']}" if "error" in par else f"TP={par['tp']}: {par['tok_s']:.1f} tok/s"
        return {**r, "result": res, "tp_run": par}
    one = run_child(
        ["decode", shape, "1", str(args.tokens), str(args.repeats)], {"CUDA_VISIBLE_DEVICES": "0"}
    )
    if "error" in par or "error" in one:
        return {
            **r,
            "result": f"error: {par.get('error') or one.get('error')}",
            "tp_run": par,
            "one_gpu": one,
        }
    ratio = par["tok_s"] / one["tok_s"]
    res = f"TP={par['tp']}: {par['tok_s']:.1f} tok/s; 1 GPU: {one['tok_s']:.1f} tok/s; {ratio:.2f}x"
    return {**r, "result": res, "tp_run": par, "one_gpu": one, "ratio": ratio}


def row_serve(args) -> dict:
    r = {
        "row": "serve8b",
        "measure": "8B, 64 streams through serve, TP=2 vs 1 GPU, output tok/s",
        "target": ">= 1.7x",
    }
    if gpu_count() < 2:
        return {**r, "result": f"not run: needs 2 GPUs, {gpu_count()} visible"}
    out = {}
    for name, env, extra in (("tp2", {}, ["--server-arg=--tensor-parallel-size=2"]),
                             ("one", {"CUDA_VISIBLE_DEVICES": "0"}, [])):  # fmt: skip
        js = Path(tempfile.mkdtemp()) / f"{name}.json"
        cmd = [sys.executable, str(HERE / "serve.py"), "--random-model", "llama3-8b", "--concurrency", "64",
               "--max-batch-size", "64", "--num-requests", "256", "--json", str(js), *extra]  # fmt: skip
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0 or not js.exists():
            return {**r, "result": f"error ({name}): {(p.stderr or p.stdout).strip()[-300:]}"}
        out[name] = json.loads(js.read_text())[0]
    key = "out_tok_per_s"
    ratio = out["tp2"][key] / out["one"][key]
    return {**r, "result": f"TP=2: {out['tp2'][key]:.0f}; 1 GPU: {out['one'][key]:.0f} ({key}); {ratio:.2f}x",
            "runs": out, "ratio": ratio}  # fmt: skip


def row_nonccl(args) -> dict:
    r = {
        "row": "nonccl",
        "measure": "2 GPUs, SPILLOVER_NO_NCCL=1: layer map, same tokens as TP=2",
        "target": "equal",
    }
    if gpu_count() < 2:
        return {**r, "result": f"not run: needs 2 GPUs, {gpu_count()} visible"}
    path = write_small_checkpoint(Path(tempfile.mkdtemp()))
    tp = run_child(["tokens", str(path), "2"])
    lm = run_child(["tokens", str(path), "0"], {"SPILLOVER_NO_NCCL": "1"})
    if "error" in tp or "error" in lm:
        return {**r, "result": f"error: {tp.get('error') or lm.get('error')}"}
    same = tp["tokens"] == lm["tokens"]
    return {**r, "result": f"NO_NCCL: tensor={lm['tp']}, map {lm['map']}; tokens {'equal' if same else 'DIFFER'} "
            f"to TP={tp['tp']}", "equal": same}  # fmt: skip


def write_small_checkpoint(root: Path) -> Path:
    """A small Llama (f32, random) as config.json + model.safetensors."""
    import torch
    from safetensors.torch import save_file

    from spillover.loading.source import random_source

    src = random_source(SMALL, "small")
    tensors = {n: src.load(n, "cpu", torch.float32).contiguous() for n in src.tensors}
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({**SMALL, "architectures": ["LlamaForCausalLM"]}))
    return root


# ------------------------------------------------------------------------------ plans (--dry-run)


def dry_run(gpu_gib: float) -> list[dict]:
    from spillover.config import AutoDeviceMapParams
    from spillover.loading.source import random_source
    from spillover.placement.inventory import hypothetical_inventory
    from spillover.placement.resolve import plan_for_source

    rows = []
    for name, shape, n, env in (("decode8b", "8b", 2, {}), ("decode70b", "70b", 4, {}),
                                ("serve8b", "8b", 2, {}), ("nonccl", "small", 2, {"SPILLOVER_NO_NCCL": "1"})):  # fmt: skip
        inv = hypothetical_inventory([int(gpu_gib * 2**30)] * n, 128 * 2**30)
        params = AutoDeviceMapParams(max_seq_len=1024, max_batch_size=64 if name == "serve8b" else 1)
        plan = plan_for_source(random_source(SHAPES[shape]), params, dtype="bf16", inventory=inv, environ=env)
        gpu = [r for r in plan.rows if r.device != "cpu"]
        rows.append({"row": name, "gpus": n, "tensor": plan.tensor_parallel, "verdict": plan.verdict,
                     "per_gpu_gib": [round(r.total_bytes / 2**30, 2) for r in gpu],
                     "reason": plan.parallel.reason if plan.parallel else ""})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plans of every row; run nothing")
    ap.add_argument("--gpu-gib", type=float, default=139.0, help="--dry-run: memory of each hypothetical GPU")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--tokens", type=int, default=256, help="decode rows: tokens per measured run")
    ap.add_argument("--repeats", type=int, default=3, help="decode rows: measured runs (median)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "decode":
            res = child_decode(rest[0], int(rest[1]) or None, int(rest[2]), int(rest[3]))
        else:
            res = child_tokens(rest[0], int(rest[1]) or None)
        print(json.dumps(res))
        return 0
    if args.dry_run:
        rows = dry_run(args.gpu_gib)
        for r in rows:
            print(f"{r['row']:<10} {r['gpus']} GPUs -> tensor={r['tensor']}  per GPU {r['per_gpu_gib']} GiB  "
                  f"{r['verdict']}  ({r['reason']})")  # fmt: skip
    else:
        wanted = args.rows.split(",")
        rows = []
        for name in wanted:
            if name == "decode8b":
                rows.append(row_decode("8b", 2, ">= 1.6x", args))
            elif name == "decode70b":
                rows.append(row_decode("70b", 4, ">= 60 tok/s (roofline ~120)", args, peer=False))
            elif name == "serve8b":
                rows.append(row_serve(args))
            elif name == "nonccl":
                rows.append(row_nonccl(args))
            print(json.dumps(rows[-1]), flush=True)
        print("\n| measure | target | result |\n| --- | --- | --- |")
        for r in rows:
            print(f"| {r['measure']} | {r['target']} | {r['result']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

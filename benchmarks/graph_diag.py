"""GPU diagnostic: CUDA-graph decode against eager decode, with the SDPA fallback forced into the graph.

    python benchmarks/graph_diag.py

Graphs are enabled in the runner only with the Triton decode kernel: with the SDPA fallback inside a graph,
tokens diverge from eager decoding from the second replay on (H100, torch 2.11). This prints the tokens of
eager decoding and of graph decoding in three variants, to tell a stale-input problem (re-capturing every
step fixes it) from a stream-ordering problem (synchronizing around the replay fixes it).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from spillover import LLM, SamplingParams  # noqa: E402
from spillover.engine import runner as R  # noqa: E402
from spillover.loading.source import random_source  # noqa: E402

CFG = dict(model_type="llama", vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
PROMPT = list(range(10, 30))
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)


def tokens(llm: LLM) -> list[tuple[int, float]]:
    out = llm.generate(PROMPT, PARAMS)
    return [(t, round(lp.logprob, 4)) for t, lp in zip(out.token_ids, out.logprobs, strict=True)]


def graph_run(run) -> list[tuple[int, float]]:
    original = R.DecodeGraphs.run
    R.DecodeGraphs.run = run
    try:
        llm = LLM(random_source(CFG), dtype="f32", device_map="cuda", progress=False)
        for graphs in llm.engine.runner.graphs.values():
            graphs.enabled = True  # force the SDPA fallback into the graph
        return tokens(llm)
    finally:
        R.DecodeGraphs.run = original


def main() -> None:
    original = R.DecodeGraphs.run

    def recapture(self, x, step):
        self.graphs = {}
        return original(self, x, step)

    def synced(self, x, step):
        torch.cuda.synchronize()
        out = original(self, x, step).clone()
        torch.cuda.synchronize()
        return out

    print(
        "eager            ",
        tokens(LLM(random_source(CFG), dtype="f32", device_map="cuda", cuda_graphs=False, progress=False)),
    )
    print("graph            ", graph_run(original))
    print("graph, recapture ", graph_run(recapture))
    print("graph, synced    ", graph_run(synced))


if __name__ == "__main__":
    main()

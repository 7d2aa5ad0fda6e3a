"""Decode CUDA graphs stay inside the pool the plan reserved (engine/graphs.py): no graph beyond the planned
buckets is ever captured, at load or at run time; on first use the planned largest graph is captured before
any other (the pool then peaks at its transients, estimate.graph_pool_bytes). On the CPU: the capture is
replaced by one that records its bucket and hands back host buffers, everything else is the real code."""

from __future__ import annotations

import types

import torch

from spillover.engine.graphs import DecodeGraphs
from spillover.placement.estimate import GRAPH_MAX_BATCH, GRAPH_MIN_CONTEXT

H = 8


def _graphs(graph_sizes: tuple[int, int] | None, max_context: int = 4096) -> tuple[DecodeGraphs, list]:
    group = types.SimpleNamespace(window=None, scratch=0)
    caches = types.SimpleNamespace(max_context=max_context, groups={None: group})
    runner = types.SimpleNamespace(caches=caches, rotary={}, graph_sizes=graph_sizes)
    graphs = DecodeGraphs(runner, ("cuda:0", 0, 2))
    captured: list[tuple[int, int]] = []

    def capture(Bb: int, Lb: int):  # noqa: ANN202
        captured.append((Bb, Lb))
        n = DecodeGraphs._layout(Bb, Lb, 1)[-1] + 2 * Bb + Bb * Lb
        io = {"x": torch.zeros(Bb, H), "packed": torch.zeros(n, dtype=torch.long), "turn": 0,
              "host": [torch.zeros(n, dtype=torch.long) for _ in range(2)], "out": torch.zeros(Bb, H)}  # fmt: skip
        return types.SimpleNamespace(replay=lambda: None), io

    graphs._capture = capture
    return graphs, captured


def _step(batch: int, ctx: int) -> types.SimpleNamespace:
    group = types.SimpleNamespace(
        slots=torch.arange(batch),
        decode_lens=[ctx] * batch,
        decode_slots=torch.zeros(batch, ctx, dtype=torch.long),
    )
    return types.SimpleNamespace(decode_rows=list(range(batch)), max_len=ctx, pos=torch.full((batch,), ctx - 1),
                                 groups={None: group})  # fmt: skip


def test_after_capture_all_larger_steps_run_eagerly():
    graphs, captured = _graphs((2, 1024))
    assert graphs.capture_all(2, 1024) == 6  # batches 1, 2 x contexts 256, 512, 1024
    assert graphs.top == (2, 1024)
    assert graphs.fits(2, 1000) and graphs.fits(1, 100)
    assert not graphs.fits(3, 100)  # more sequences than max_batch_size: eager, no capture
    assert not graphs.fits(1, 1025)  # a context past max_seq_len's bucket: eager
    out = graphs.run(torch.ones(2, H), _step(2, 700))
    assert out.shape == (2, H)
    assert len(captured) == 6 and sorted(captured, reverse=True) == captured  # largest first, nothing since


def test_capture_all_below_the_plan_is_the_limit():
    graphs, _ = _graphs((8, 4096))
    graphs.capture_all(2, 512)
    assert graphs.top == (2, 512) and not graphs.fits(4, 100) and not graphs.fits(1, 600)


def test_lazy_capture_takes_the_planned_top_first_and_nothing_beyond():
    graphs, captured = _graphs((4, 2048))
    assert graphs.top == (4, 2048) and not graphs.fits(5, 100) and not graphs.fits(1, 2049)
    graphs.run(torch.ones(1, H), _step(1, 300))
    assert captured == [(4, 2048), (1, 512)]
    graphs.run(torch.ones(3, H), _step(3, 1500))  # bucket (4, 2048): the top, there already
    graphs.run(torch.ones(2, H), _step(2, 600))
    assert captured == [(4, 2048), (1, 512), (2, 1024)]


def test_without_planned_sizes_the_graphs_own_limits_hold():
    graphs, _ = _graphs(None, max_context=1000)
    assert graphs.top == (GRAPH_MAX_BATCH, 1024)
    assert graphs.fits(GRAPH_MAX_BATCH, 1000) and not graphs.fits(GRAPH_MAX_BATCH + 1, 10)
    assert GRAPH_MIN_CONTEXT == 256 and graphs.key(1, 1) == (1, 256)

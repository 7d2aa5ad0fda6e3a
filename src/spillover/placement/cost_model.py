"""The offload cost model: how long the CPU-resident layers of a model take per step, by strategy.

Pure numbers (no torch), so every choice is testable with hypothetical hardware. Two ways to run a layer
whose weights live in CPU memory:

- "cpu": compute it on the CPU. Time = max(weight bytes / CPU GEMV bandwidth, FLOPs / CPU FLOP rate):
  decode (a few tokens) reads every weight once and is bound by memory bandwidth; prefill multiplies each
  weight by every token and is bound by arithmetic.
- "stream": copy its weights from pinned host memory to a GPU staging buffer and compute there.
  Time = max(weight bytes / pinned H2D bandwidth, FLOPs / GPU FLOP rate); the copy of the next streamed
  layer runs on a side stream while this one computes (engine/offload.py).

The two paths use different engines (CPU cores vs the GPU's copy engine), so splitting the CPU-resident
layers between them runs both at once: a step then takes about
    max(streamed bytes / H2D,  CPU-computed time + GPU compute + hops,  all CPU-resident bytes / host DRAM)
(the last term: both engines read the same host memory, and together they saturate it)
because the copy engine prefetches streamed layers while the CPU computes its layers (the streamed layers
are spread evenly among the CPU-resident ones so that a copy is always in flight). `best_split` picks the
number of streamed layers that minimises this for decode; `gpu_prefill_tokens` says from how many tokens a
step is faster with every CPU-resident layer streamed (the CPU then only holds weights and KV).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GB = 1e9

HOP_SECONDS = 60e-6
"""One GPU->CPU->GPU round trip of the hidden states between a CPU-computed layer and a GPU layer: a
device-to-host copy the CPU must wait for (~20 us of launch + sync latency), a host-to-device copy and the
kernel launches restarting behind it. 60 us is an allowance; the benchmark reports the measured step time."""

GPU_LAYER_OVERHEAD_SECONDS = 250e-6
"""Python and kernel-launch time of one eager decoder layer on a GPU (~20 kernels at ~10 us each, plus the
runner's Python). At batch 1 this, not HBM bandwidth, is what a GPU layer costs (436 MB / 3 TB/s = 0.15 ms)."""

CPU_PATH_EFFICIENCY = 0.7
"""Share of the GEMV microbenchmark's bandwidth a CPU-computed decoder layer reaches in the engine: measured
40.8 GB/s of 58.2 (the 8 GiB --offload cpu run, H100 machine): norms, rope, attention over the CPU KV cache
and seven separate GEMVs per layer instead of one long one."""

OFFLOAD_MODES = ("auto", "cpu", "stream")


@dataclass(frozen=True)
class Bandwidths:
    """Rates of one machine. Defaults: the H100 machine of ARCHITECTURE.md (16 vCPU, PCIe Gen5).

    cpu_tflops is not in that table: a bf16 GEMM on 16 Sapphire Rapids cores with AMX reaches a few
    TFLOP/s, without AMX well under one; 1.0 is a middle guess that only matters for prefill on the CPU.

    host_mem_gbps: host DRAM read bandwidth shared by the copy engine (DMA reads pinned pages) and the CPU
    GEMV. Each path alone reaches its own roofline, together they share this. Measured on the H100 machine
    (benchmarks/offload.py, 8 GiB auto run): 31.7 GB/s streamed + 34.9 GB/s CPU-computed = 66.6 GB/s, each path
    at ~60% of its solo roofline; close to that machine's 73.9 GB/s memcpy figure."""

    pinned_h2d_gbps: float = 54.7
    cpu_gemv_gbps: float = 38.8
    gpu_mem_gbps: float = 3019.0
    cpu_tflops: float = 1.0
    gpu_tflops: float = 700.0
    host_mem_gbps: float = 66.6
    source: str = "defaults (ARCHITECTURE.md, H100 machine)"

    @classmethod
    def from_calibration(cls, cal: Any | None) -> Bandwidths:
        """From a `spillover.calibration.Calibration` (None, or missing GPU figures: the defaults)."""
        if cal is None:
            return cls()
        d = cls()
        gemv = cal.cpu_gemv_gbps or d.cpu_gemv_gbps
        return cls(
            pinned_h2d_gbps=cal.pinned_h2d_gbps or d.pinned_h2d_gbps,
            cpu_gemv_gbps=gemv,
            gpu_mem_gbps=cal.gpu_mem_gbps or d.gpu_mem_gbps,
            # a GEMV that streams its weights at the memory roofline reads at the host's bandwidth, which
            # copies and CPU compute then share: never below what the GEMV alone reached
            host_mem_gbps=max(d.host_mem_gbps, gemv),
            source=f"calibration of {cal.device_name} ({cal.measured_at})",
        )


PAGEABLE_H2D_FRACTION = 0.5
"""Host->GPU copies from pageable (not pinned) memory reach about half the pinned rate (a bounce buffer)."""


def expert_stream_pairs(
    expert_params: int, num_experts: int, bw: Bandwidths, dtype_bytes: int = 2, pinned: bool = False
) -> int:
    """MoE prefill: the (token, slot) pairs of a step from which copying a CPU-resident layer's experts to the
    GPU (every expert assumed hit; from pinned memory or pageable) and computing them there is predicted
    faster than computing the chosen experts on the CPU (FLOP-bound at that size: 2 x pairs x expert_params).
    Decode steps stay far below it. Qwen3-30B-A3B with the defaults, pageable: 1.2 GB per layer over ~27 GB/s
    = 45 ms, the CPU's 45 ms at 1 TFLOP/s is ~4700 pairs (600 tokens at top-8); pinned: half. Checked on the
    H200 (benchmarks/RESULTS-moe.md): 16,384 pairs copied from pinned memory 0.83 s, computed on the CPU 5.45
    s (0.9 TFLOP/s, near the default)."""
    h2d = bw.pinned_h2d_gbps * (1.0 if pinned else PAGEABLE_H2D_FRACTION)
    copy = num_experts * expert_params * dtype_bytes / (h2d * GB)
    return max(1, math.ceil(copy * bw.cpu_tflops * 1e12 / (2 * expert_params)))


def cpu_layer_seconds(nbytes: int, tokens: int, bw: Bandwidths, bytes_per_param: float = 2.0) -> float:
    """One layer computed on the CPU: memory-bound for few tokens, FLOP-bound for many."""
    flops = 2.0 * tokens * nbytes / bytes_per_param
    return max(nbytes / (CPU_PATH_EFFICIENCY * bw.cpu_gemv_gbps * GB), flops / (bw.cpu_tflops * 1e12))


def gpu_layer_seconds(nbytes: int, tokens: int, bw: Bandwidths, bytes_per_param: float = 2.0) -> float:
    """One layer computed on the GPU with its weights already there."""
    flops = 2.0 * tokens * nbytes / bytes_per_param
    return GPU_LAYER_OVERHEAD_SECONDS + max(nbytes / (bw.gpu_mem_gbps * GB), flops / (bw.gpu_tflops * 1e12))


def copy_seconds(nbytes: int, bw: Bandwidths) -> float:
    """Pinned host->GPU copy of one layer's weights."""
    return nbytes / (bw.pinned_h2d_gbps * GB)


def spread(candidates: Sequence[int], n: int) -> tuple[int, ...]:
    """n of `candidates`, evenly spaced (so streamed copies interleave with CPU-computed layers)."""
    k = len(candidates)
    if n <= 0 or k == 0:
        return ()
    if n >= k:
        return tuple(candidates)
    return tuple(candidates[(j * k) // n + (k // n) // 2] for j in range(n))


@dataclass(frozen=True)
class StepEstimate:
    """Predicted time of the offloaded part of one step (the layers whose weights are in CPU memory)."""

    seconds: float
    copy_seconds: float  # copy engine busy time (streamed weights)
    compute_seconds: float  # CPU-computed layers + GPU compute of streamed layers + hops


def step_seconds(
    layer_bytes: Sequence[int],
    streamed: Sequence[int],
    cpu: Sequence[int],
    tokens: int,
    bw: Bandwidths,
    layer_params: Sequence[int] | None = None,
) -> StepEstimate:
    """Time of a step over the CPU-resident layers: `streamed` ones run on the GPU, `cpu` ones on the CPU.
    `layer_params`: weights per layer, for the FLOPs (default: bytes / 2; quantized layers hold fewer bytes
    per weight: int4 0.625, so their FLOPs must come from the weight count)."""
    bpp = [
        b / p if p else 2.0 for b, p in zip(layer_bytes, layer_params or [0] * len(layer_bytes), strict=True)
    ]
    copy = sum(copy_seconds(layer_bytes[i], bw) for i in streamed)
    gpu = sum(gpu_layer_seconds(layer_bytes[i], tokens, bw, bpp[i]) for i in streamed)
    on_cpu = sum(cpu_layer_seconds(layer_bytes[i], tokens, bw, bpp[i]) for i in cpu)
    hops = HOP_SECONDS * _runs(cpu)
    compute = gpu + on_cpu + hops
    host = sum(layer_bytes[i] for i in (*streamed, *cpu)) / (bw.host_mem_gbps * GB)  # shared DRAM reads
    return StepEstimate(max(copy, compute, host), copy, compute)


def _runs(layers: Sequence[int]) -> int:
    """Contiguous runs in a sorted layer list: each run costs one GPU->CPU->GPU hop."""
    s = sorted(layers)
    return sum(1 for j, i in enumerate(s) if j == 0 or i != s[j - 1] + 1)


@dataclass(frozen=True)
class Split:
    streamed: tuple[int, ...]
    cpu: tuple[int, ...]
    decode: StepEstimate  # batch `tokens` decode step over the CPU-resident layers


def best_split(
    layer_bytes: Sequence[int],
    resident: Sequence[int],
    bw: Bandwidths,
    tokens: int = 1,
    layer_params: Sequence[int] | None = None,
) -> Split:
    """The split of the CPU-resident layers between streaming and CPU compute with the fastest decode step
    (batch `tokens`). When shared host DRAM bounds several splits equally, the one that balances copies
    and compute wins: it leaves each engine the most slack (measured: the CPU path in the engine reaches ~70%
    of the GEMV microbenchmark, so a split leaning on the CPU loses what the model cannot see)."""
    best: tuple[tuple[float, float], Split] | None = None
    for n in range(len(resident) + 1):
        streamed = spread(resident, n)
        cpu = tuple(i for i in resident if i not in streamed)
        est = step_seconds(layer_bytes, streamed, cpu, tokens, bw, layer_params)
        key = (round(est.seconds, 4), max(est.copy_seconds, est.compute_seconds))  # 0.1 ms resolution
        if best is None or key < best[0]:
            best = (key, Split(streamed, cpu, est))
    assert best is not None
    return best[1]


def gpu_prefill_tokens(
    layer_bytes: Sequence[int],
    streamed: Sequence[int],
    cpu: Sequence[int],
    bw: Bandwidths,
    limit: int = 1 << 16,
    layer_params: Sequence[int] | None = None,
) -> int | None:
    """Fewest tokens in a step from which streaming every CPU-resident layer (the CPU-computed ones too,
    their KV read from and written back to CPU memory) beats the split. None: never within `limit`."""
    if not cpu:
        return None
    everything = tuple(sorted((*streamed, *cpu)))
    t = 1
    while t <= limit:
        if (
            step_seconds(layer_bytes, everything, (), t, bw, layer_params).seconds
            < step_seconds(layer_bytes, streamed, cpu, t, bw, layer_params).seconds
        ):
            lo = t // 2 + 1  # refine between the last power of two that lost and this one
            while lo < t:
                mid = (lo + t) // 2
                if (
                    step_seconds(layer_bytes, everything, (), mid, bw, layer_params).seconds
                    < step_seconds(layer_bytes, streamed, cpu, mid, bw, layer_params).seconds
                ):
                    t = mid
                else:
                    lo = mid + 1
            return t
        t *= 2
    return None

"""Inventory: hypothetical machines, the unified-memory fraction, probes that work without a GPU."""

from __future__ import annotations

import pytest

from spillover.errors import ConfigError
from spillover.placement.inventory import (
    DEFAULT_IGPU_MEMORY_FRACTION,
    gpu_driver_installed,
    hypothetical_inventory,
    igpu_memory_fraction,
    is_unified_cuda,
    probe_cpu,
    probe_cuda,
    probe_inventory,
)

GiB = 1 << 30


def test_fraction_default_and_valid_values():
    assert igpu_memory_fraction({}) == DEFAULT_IGPU_MEMORY_FRACTION == 0.75
    assert igpu_memory_fraction({"SPILLOVER_IGPU_MEMORY_FRACTION": "0.5"}) == 0.5
    assert igpu_memory_fraction({"SPILLOVER_IGPU_MEMORY_FRACTION": "1"}) == 1.0


@pytest.mark.parametrize("raw", ["0", "-0.1", "1.01", "abc", "nan", "inf"])
def test_fraction_rejects_out_of_range(raw):
    with pytest.raises(ConfigError, match=r"SPILLOVER_IGPU_MEMORY_FRACTION must be a number in \(0, 1\]"):
        igpu_memory_fraction({"SPILLOVER_IGPU_MEMORY_FRACTION": raw})


def test_hypothetical_gpus_in_ordinal_order():
    inv = hypothetical_inventory([24 * GiB, 12 * GiB], 64 * GiB)
    assert [g.device for g in inv.gpus] == ["cuda:0", "cuda:1"]
    assert [g.free_bytes for g in inv.gpus] == [24 * GiB, 12 * GiB]
    assert inv.cpu.available_bytes == 64 * GiB and inv.hypothetical and not inv.unified
    assert not inv.gpus[0].context_included  # a made-up GPU has not paid for a CUDA context yet
    assert inv.cuda_bf16


def test_hypothetical_unified_without_gpu_size_is_one_gpu_of_system_ram():
    inv = hypothetical_inventory([], 32 * GiB, unified=True)
    assert len(inv.gpus) == 1 and inv.gpus[0].unified and inv.unified


def test_hypothetical_cpu_defaults_to_this_machine():
    inv = hypothetical_inventory([8 * GiB])
    assert inv.cpu.available_bytes > 0


def test_unified_detection():
    assert is_unified_cuda("NVIDIA H100 80GB HBM3", is_integrated=True)
    assert is_unified_cuda("Orin", is_integrated=False)
    assert is_unified_cuda("NVIDIA GB10", is_integrated=False)
    assert not is_unified_cuda("NVIDIA GH200 480GB", is_integrated=False)  # own HBM
    assert not is_unified_cuda("NVIDIA GeForce RTX 4090", is_integrated=False)


def test_probes_on_a_cpu_machine():
    cpu = probe_cpu()
    assert 0 < cpu.available_bytes <= cpu.total_bytes
    import torch

    assert gpu_driver_installed() or not torch.cuda.is_available()  # no driver: the probe skips torch
    if not torch.cuda.is_available():
        assert probe_cuda() == []
        assert probe_inventory().gpus == () or probe_inventory().gpus[0].device == "mps"

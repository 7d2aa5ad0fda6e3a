"""Device placement: inventory (what hardware there is), estimate (bytes), planner (pure), DeviceMap.

The loader, the runner and the SDK call:
    inv = probe_inventory()                                   # or hypothetical_inventory([...])
    budgets = device_budgets(inv, parse_max_memory(...), igpu_memory_fraction())
    dtype = resolve_model_dtype(requested, inv.cuda_bf16)
    plan = plan_model(config, params, budgets, dtype, tensors, isq, paged, device_map=None | parse_device_layers(...))
    require_fit(plan).device_map                              # PlacementError when an automatic plan cannot fit
Nothing here imports torch at module level.
"""

from __future__ import annotations

from spillover.placement.device_map import DeviceMap, note_manual_map_once, parse_device_layers
from spillover.placement.estimate import (
    KV_BLOCK_SIZE,
    MAX_BATCHED_TOKENS,
    Requirements,
    kv_cache_bytes_per_layer,
    requirements,
    resolve_model_dtype,
)
from spillover.placement.inventory import (
    CpuInfo,
    GpuInfo,
    Inventory,
    hypothetical_inventory,
    igpu_memory_fraction,
    probe_inventory,
)
from spillover.placement.planner import (
    DeviceBudget,
    DeviceRow,
    Plan,
    device_budgets,
    parse_max_memory,
    plan_auto,
    plan_manual,
    plan_model,
    require_fit,
)
from spillover.placement.report import plan_table, plan_to_json

__all__ = [
    "KV_BLOCK_SIZE",
    "MAX_BATCHED_TOKENS",
    "CpuInfo",
    "DeviceBudget",
    "DeviceMap",
    "DeviceRow",
    "GpuInfo",
    "Inventory",
    "Plan",
    "Requirements",
    "device_budgets",
    "hypothetical_inventory",
    "igpu_memory_fraction",
    "kv_cache_bytes_per_layer",
    "note_manual_map_once",
    "parse_device_layers",
    "parse_max_memory",
    "plan_auto",
    "plan_manual",
    "plan_model",
    "plan_table",
    "plan_to_json",
    "probe_inventory",
    "require_fit",
    "requirements",
    "resolve_model_dtype",
]

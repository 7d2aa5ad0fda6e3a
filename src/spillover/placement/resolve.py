"""From user settings to a Plan: the one path shared by `spillover plan`, `run`, `serve` and the SDK."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from spillover.config import AutoDeviceMapParams, resolve_dtype_name
from spillover.placement.cost_model import Bandwidths
from spillover.placement.device_map import DeviceMap, note_manual_map_once, parse_device_layers
from spillover.placement.estimate import resolve_model_dtype
from spillover.placement.inventory import Inventory, igpu_memory_fraction, probe_inventory
from spillover.placement.planner import Plan, device_budgets, parse_max_memory, plan_model
from spillover.quant.formats import parse_isq


def plan_for_source(
    source: Any,
    params: AutoDeviceMapParams,
    *,
    dtype: str = "auto",
    max_memory: Mapping[str, Any] | list[str] | None = None,
    isq: int | str | None = None,
    paged: bool = True,
    device_layers: DeviceMap | str | int | list[str] | None = None,
    inventory: Inventory | None = None,
    offload: str = "auto",
    bandwidths: Bandwidths | None = None,
) -> Plan:
    """Plan `source` (a ModelSource) on `inventory` (probed when None). A manual map is checked, not changed.
    `offload`: how CPU-resident layers run ("auto", "cpu", "stream"); `bandwidths`: the machine's rates
    for the cost model (default: this machine's cached calibration when the inventory was probed, else the
    built-in figures)."""
    probed = inventory is None
    inventory = inventory or probe_inventory()
    budgets = device_budgets(inventory, parse_max_memory(max_memory), igpu_memory_fraction())
    device_map = None
    if isinstance(device_layers, DeviceMap):
        device_map = device_layers
    elif device_layers is not None:
        note_manual_map_once()
        gpus = list(inventory.gpus)
        kind = gpus[0].kind if gpus else "cuda"
        device_map = parse_device_layers(device_layers, source.config.num_hidden_layers, len(gpus), kind)
    model_dtype = resolve_model_dtype(resolve_dtype_name(dtype), inventory.cuda_bf16)
    plan = plan_model(
        source.config, params, budgets, model_dtype, source.tensors, parse_isq(isq), paged, device_map, source.name,
        offload, bandwidths or (machine_bandwidths() if probed else Bandwidths()),
    )  # fmt: skip
    notes = inventory.notes + (("unified memory: GPU and CPU share system RAM",) if inventory.unified else ())
    return dataclasses.replace(plan, notes=notes + plan.notes)


def machine_bandwidths() -> Bandwidths:
    """This machine's cached calibration (`spillover doctor --bench`), else the built-in figures."""
    try:
        from spillover.calibration import load
    except ImportError:  # calibration.py not present in this build
        return Bandwidths()
    try:
        return Bandwidths.from_calibration(load())
    except Exception:  # a broken cache must never stop a run: the defaults are a fine guess
        return Bandwidths()

"""From user settings to a Plan: the one path shared by `spillover plan`, `run`, `serve` and the SDK."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

from spillover.config import AutoDeviceMapParams, resolve_dtype_name
from spillover.errors import ConfigError
from spillover.placement.cost_model import Bandwidths
from spillover.placement.device_map import DeviceMap, note_manual_map_once, parse_device_layers
from spillover.placement.estimate import requirements, resolve_model_dtype
from spillover.placement.inventory import Inventory, igpu_memory_fraction, probe_inventory
from spillover.placement.planner import (
    TP_NOTE,
    DeviceBudget,
    DeviceRow,
    Plan,
    device_budgets,
    parse_max_memory,
    plan_model,
)
from spillover.placement.tensor_parallel import TPPlan, plan_tensor_parallel, tp_problem
from spillover.quant.formats import GGUF_CPU_SOURCE, GGUFKeep, isq_note, parse_isq


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
    tensor_parallel_size: int | None = None,
    environ: Mapping[str, str] | None = None,
    n_cpu_moe: int | None = None,
) -> Plan:
    """Plan `source` (a ModelSource) on `inventory` (probed when None). A manual map is checked, not changed.
    `offload`: how CPU-resident layers run ("auto", "cpu", "stream"); `bandwidths`: the machine's rates
    for the cost model (default: this machine's cached calibration when the inventory was probed, else the
    built-in figures). With several CUDA GPUs the plan is tensor-parallel when it can be (tensor_parallel.py);
    `tensor_parallel_size` asks for a size."""
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
    keep = gguf_keep() if keeps_gguf_blocks(source, dtype, isq) else None
    plan = plan_model(
        source.config, params, budgets, model_dtype, source.tensors, parse_isq(isq), paged, device_map, source.name,
        offload, bandwidths or (machine_bandwidths() if probed else Bandwidths()), n_cpu_moe, keep,
    )  # fmt: skip
    notes = inventory.notes + (("unified memory: GPU and CPU share system RAM",) if inventory.unified else ())
    notes += tuple(n for n in (isq_note(isq),) if n)
    plan = dataclasses.replace(plan, notes=notes + plan.notes)
    return with_tensor_parallel(
        plan, source.config, requirements(source.config, params, model_dtype, source.tensors, parse_isq(isq), paged),
        budgets, tensor_parallel_size, os.environ if environ is None else environ,
        device_map is not None or n_cpu_moe is not None,
    )  # fmt: skip


def keeps_gguf_blocks(source: Any, dtype: str, isq: int | str | None) -> bool:
    """Whether a load keeps a GGUF's block-quantized weights as they are where a kernel reads them (the
    default mode: `--dtype auto`, no `--isq`; quant/gguf_native.py on the CPU, quant/gguf_gpu.py on a GPU).
    A tensor-parallel plan dequantizes (its rows are planned without this)."""
    return (
        getattr(source, "kind", None) == "gguf"
        and resolve_dtype_name(dtype) == "auto"
        and parse_isq(isq) is None
    )


def gguf_keep() -> GGUFKeep:
    """What this machine keeps of a GGUF's blocks: all the C kernels' types where their library builds, or only
    Q4_0 / Q4_1 without them (builds it on first use, as loading would). A process that has torch (a run, the
    SDK) gets the loader's own answer, `gguf_kernels.library()`; without torch (`spillover plan`) the library
    is built, not loaded: it must be loaded after torch, whose OpenMP runtime it shares."""
    if "torch" in sys.modules:
        from spillover.quant.gguf_kernels import library

        return GGUFKeep(cpu_kernels=library() is not None)
    from spillover import native

    return GGUFKeep(cpu_kernels=native.compiled(GGUF_CPU_SOURCE) is not None)


def with_tensor_parallel(
    plan: Plan, config: Any, req: Any, budgets: tuple[DeviceBudget, ...], requested: int | None,
    environ: Mapping[str, str], manual: bool,
) -> Plan:  # fmt: skip
    """The plan with the tensor-parallel decision: unchanged (plus the reason) on the layer map, or one row
    per GPU's share when tensor-parallel."""
    if requested and requested > 1 and environ.get("SPILLOVER_TP_BACKEND", "").lower() == "gloo":
        problem = tp_problem(config, requested)
        if problem:
            raise ConfigError(f"cannot run tensor-parallel over {requested} processes: {problem}")
        tp = TPPlan(requested, f"tensor-parallel over {requested} CPU processes (gloo)")
        return dataclasses.replace(plan, parallel=tp, notes=plan.notes + (tp.reason,))
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched > 1 and "MASTER_ADDR" in environ:  # torchrun, possibly over several machines
        if requested not in (None, launched):
            raise ConfigError(
                f"torchrun started {launched} processes but --tensor-parallel-size is {requested}"
            )
        problem = tp_problem(config, launched)
        if problem:
            raise ConfigError(f"cannot run tensor-parallel over the {launched} torchrun processes: {problem}")
        tp = TPPlan(launched, f"tensor-parallel over the {launched} processes torchrun started")
        return dataclasses.replace(plan, parallel=tp, notes=plan.notes + (tp.reason,))
    gpus = [(b.device, b.capacity_bytes, b.budget_bytes) for b in budgets if b.kind == "cuda"]
    tp = plan_tensor_parallel(config, req, gpus, requested, environ, manual)
    notes = tuple(n for n in plan.notes if n != TP_NOTE)
    if len(gpus) > 1 or requested:
        notes += (tp.reason,)
    if not tp.used:
        return dataclasses.replace(plan, parallel=tp, notes=notes)
    layers = tuple(range(config.num_hidden_layers))
    rows = tuple(
        DeviceRow(g.device, layers, True, True, g.weight_bytes, g.kv_cache_bytes, g.activation_bytes,
                  g.other_bytes, g.capacity_bytes, g.budget_bytes)
        for g in tp.gpus
    )  # fmt: skip
    cpu = next((b for b in budgets if b.kind == "cpu"), None)
    if cpu is not None:  # rank 0's process: runtime and load staging
        rows += (DeviceRow("cpu", (), False, False, 0, 0, 0, req.other("cpu", True, True), cpu.capacity_bytes,
                           cpu.budget_bytes),)  # fmt: skip
    dm = DeviceMap.single(gpus[0][0], config.num_hidden_layers)
    notes = tuple(n for n in notes if not n.startswith("offload:") and not n.startswith("layers "))
    verdict = f"fits tensor-parallel over {tp.size} GPUs ({', '.join(g.device for g in tp.gpus)})"
    return dataclasses.replace(plan, device_map=dm, rows=rows, fits=True, verdict=verdict, notes=notes, hints=(),
                               parallel=tp)  # fmt: skip


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

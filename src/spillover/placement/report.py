"""How a Plan is shown: the table `spillover plan` prints (rich) and its JSON (`plan --json`, doctor's report).
Keys are only ever added to the JSON, never renamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spillover.placement.device_map import DeviceMap, format_gib, format_layers
from spillover.placement.planner import Plan

if TYPE_CHECKING:
    from rich.table import Table


def plan_table(plan: Plan) -> Table:
    """One row per device: layers, weights, KV cache, activations, other, total, capacity, headroom (GiB)."""
    from rich.table import Table

    tp = getattr(plan, "tensor_parallel", 1)
    title = f"{plan.model}: {plan.num_layers} layers" + (
        f", tensor-parallel over {tp} GPUs (per-GPU shares)" if tp > 1 else ""
    )
    table = Table(title=title, title_justify="left")
    for col in (
        "device",
        "layers",
        "weights",
        "KV cache",
        "activations",
        "other",
        "total",
        "capacity",
        "headroom",
    ):
        table.add_column(col, justify="left" if col in ("device", "layers") else "right")
    for r in plan.rows:
        own = [i for i in r.layers if i not in r.streamed]
        layers = format_layers(own)
        if r.streamed:
            what = "weights of streamed" if r.device == "cpu" else "streamed, KV here:"
            layers = (layers + "; " if own else "") + f"{what} {format_layers(r.streamed)}"
        extras = [n for n, on in (("vision", getattr(r, "has_vision", False)), ("embed", r.has_embed),
                                  ("head", r.has_head)) if on]  # fmt: skip
        if extras:
            layers += f" +{'+'.join(extras)}"
        if getattr(r, "experts", ()):
            layers = (layers + "; " if own or extras else "") + f"experts of {format_layers(r.experts)}"
        headroom = format_gib(r.headroom_bytes)
        style = "red" if r.headroom_bytes < 0 else None
        table.add_row(
            r.device, layers, format_gib(r.weight_bytes), format_gib(r.kv_cache_bytes),
            format_gib(r.activation_bytes), format_gib(r.other_bytes), format_gib(r.total_bytes),
            format_gib(r.capacity_bytes), f"[{style}]{headroom}[/]" if style else headroom,
        )  # fmt: skip
    vision = getattr(plan, "vision", None)
    if vision:  # the vision stage on its own line (its bytes are in its device's row above)
        table.add_row(
            "  vision", f"tower + projector on {plan.device_map.stage_device('vision')}",
            format_gib(vision["weight_bytes"]), format_gib(vision["kv_cache_bytes"]),
            format_gib(vision["activation_bytes"]), "-", "-", "-", "-",
        )  # fmt: skip
    table.caption = "sizes in GiB; capacity = usable memory after the safety margin"
    if vision:
        table.caption += (
            f"; vision: {vision['images']} image(s) of {vision['edge']} px, {vision['tokens']} tokens each in "
            "the KV cache of every sequence (counted in its layers' KV cache)"
        )
    split = plan.device_map.split_experts()
    if split:
        table.caption += (
            f"; MoE: the experts of layers {format_layers(split)} are held and computed where 'experts of' "
            "says, the rest of those layers (attention, router, KV cache) where 'layers' says"
        )
    if any(r.streamed for r in plan.rows):
        table.caption += (
            "; streamed layers: weights in pinned CPU memory (counted there), computed on the GPU that holds "
            "their KV cache and staging buffers (counted in 'other')"
        )
    return table


def offload_json(dm: DeviceMap) -> dict[str, Any]:
    """How CPU-resident layers run, and where each one's KV cache lives (issue 5)."""
    cpu = dm.layers_on("cpu")
    return {
        "streamed": list(dm.streamed),
        "cpu_computed": cpu,
        "prefill_streamed_to": dm.stream_gpu() if cpu else None,  # CPU layers streamed for long prompts
        "kv_cache": {str(i): dm.layers[i] for i in (*dm.streamed, *cpu)},
    }


def experts_json(dm: DeviceMap) -> dict[str, str] | None:
    """MoE models: layer number -> the device of its experts (None for dense models)."""
    return {str(i): d for i, d in enumerate(dm.experts)} if dm.experts else None


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The `spillover plan --json` document (keys promised in issue 3, plus a few more)."""
    return {
        "model": plan.model,
        "num_layers": plan.num_layers,
        "fits": plan.fits,
        "params": dict(plan.params),
        "devices": [
            {
                "device": r.device,
                "capacity_bytes": r.capacity_bytes,
                "layers": list(r.layers),
                "weight_bytes": r.weight_bytes,
                "kv_cache_bytes": r.kv_cache_bytes,
                "activation_bytes": r.activation_bytes,
                "other_bytes": r.other_bytes,
                "total_bytes": r.total_bytes,
                "headroom_bytes": r.headroom_bytes,
                "budget_bytes": r.budget_bytes,
                "embed": r.has_embed,
                "head": r.has_head,
                "vision": getattr(r, "has_vision", False),
                "experts_of_layers": list(getattr(r, "experts", ())),
            }
            for r in plan.rows
        ],
        "device_map": plan.device_map.to_dict(),
        "stages": plan.device_map.stages(),
        "offload": offload_json(plan.device_map),
        "experts": experts_json(plan.device_map),
        "manual": plan.manual,
        "verdict": plan.verdict,
        "notes": list(plan.notes),
        "hints": list(plan.hints),
        "parallel": {"tensor": getattr(plan, "tensor_parallel", 1)},
        "vision": getattr(plan, "vision", None),
    }

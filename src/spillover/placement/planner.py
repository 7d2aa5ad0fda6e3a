"""The planner: numbers in, DeviceMap out. No torch import, so every rule is testable on hypothetical hardware.

Stages: `device_budgets(inventory, max_memory, fraction)` turns hardware into usable capacities;
`requirements(...)` (estimate.py) turns a model and mapping parameters into bytes; `plan_auto` / `plan_manual`
place the parts and return a `Plan` (per-device rows, fits flag, verdict). `plan_model` does all three and
adds suggestions when the model does not fit; `require_fit` turns a failed plan into a PlacementError.

Placement rules (automatic):
1. If everything (weights, KV cache, activations, reserves) fits on the first GPU, everything goes there:
   no change from a plain single-GPU run.
2. Otherwise layers fill the GPUs in ordinal order, each GPU a contiguous range, as many as fit with their KV
   cache and the GPU's activation reserve; the remaining layers go to the CPU.
0. Vision models: the vision tower and projector go to the first GPU that holds them (with their
   activations for max_num_images images of max_image_length edge) before anything else; the layers fill
   the room they leave, so larger image parameters move layers off the GPU, never the tower.
3. Then the head (final norm + lm_head) takes leftover GPU room, trying the last GPU layer's device first.
   Why layers before the head: decoding reads every weight once per token, so a byte of lm_head on the CPU
   costs the same as a byte of layers there; but prefill multiplies each layer weight by every prompt token,
   while lm_head only sees the last token of each sequence. GPU bytes are therefore worth more as layers,
   and the head gets the room that is too small for one more layer (lm_head is one large matmul, so it is
   the best use of that room: it stays on a GPU whenever it fits there).
4. Then the embeddings take leftover GPU room, trying layer 0's device first (saves copying the step's
   hidden states to the GPU); otherwise they stay on the CPU, where the lookup is a cheap gather and only
   T x hidden values cross to the GPU per step. Tied embeddings go with the head when they can, so the
   matrix is stored once.
With several CUDA GPUs, `resolve.plan_for_source` prefers tensor parallelism (`tensor_parallel.py`); this
planner's layer map is what runs when TP is off, impossible, or does not fit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spillover.config import AutoDeviceMapParams, ModelConfig, parse_bytes
from spillover.errors import ConfigError, PlacementError, UnknownDeviceError
from spillover.placement.cost_model import (
    OFFLOAD_MODES,
    Bandwidths,
    StepEstimate,
    best_split,
    gpu_prefill_tokens,
    step_seconds,
)
from spillover.placement.device_map import DeviceMap, format_layers
from spillover.placement.estimate import (
    CUDA_CONTEXT_BYTES,
    ByteBudget,
    GiB,
    MiB,
    Requirements,
    TensorLike,
    requirements,
)
from spillover.placement.inventory import Inventory
from spillover.quant.formats import GGUFKeep

GPU_SAFETY_MARGIN_FRACTION = 0.02
"""Kept free on each GPU: 2% of its budget (1.6 GiB on 80 GiB, 0.5 GiB on 24 GiB). Free memory moves between
planning and loading (other processes, the display server on desktops, NCCL/driver allocations we do not
model), and the estimate of transients is a model, not a measurement of this exact prompt."""

GPU_SAFETY_MARGIN_MIN = 256 * MiB
"""Floor of the GPU margin, so small GPUs keep a few kernels' worth of room too."""

CPU_SAFETY_MARGIN_FRACTION = 0.05
"""Kept free in CPU memory: 5% of the budget. `available` counts reclaimable page cache, and loading fills the
page cache with the weight file; other programs' memory also moves. Running out on the CPU means swapping
(every CPU layer then crawls) or the OOM killer, so the margin is wider than on the GPU."""

CPU_SAFETY_MARGIN_MIN = 512 * MiB
"""Floor of the CPU margin: the OS needs some free pages to stay responsive under memory pressure."""

log = logging.getLogger(__name__)

TP_NOTE = "TP not yet implemented; layers split across GPUs"


@dataclass(frozen=True)
class DeviceBudget:
    """One device as the planner sees it."""

    device: str  # "cuda:0", "mps", "cpu"
    kind: str  # "cuda" | "mps" | "cpu"
    budget_bytes: int  # min(free, --max-memory cap), unified share applied
    capacity_bytes: int  # budget minus the safety margin: what the plan may fill
    context_included: bool = True  # CUDA: the budget already excludes this process's context
    capped: bool = False  # set by --max-memory: a limit on everything the process holds there


def margin_bytes(kind: str, budget: int) -> int:
    if kind == "cpu":
        return max(CPU_SAFETY_MARGIN_MIN, int(budget * CPU_SAFETY_MARGIN_FRACTION))
    return max(GPU_SAFETY_MARGIN_MIN, int(budget * GPU_SAFETY_MARGIN_FRACTION))


def make_budget(
    device: str, budget: int, context_included: bool = True, capped: bool = False
) -> DeviceBudget:
    """A budget with the safety margin taken off (capacity never below 0)."""
    kind = device.split(":")[0]
    capacity = max(0, budget - margin_bytes(kind, budget))
    return DeviceBudget(device, kind, budget, capacity, context_included, capped)


def normalize_device(name: str) -> str:
    """'0' / 'cuda' / 'CUDA:1' / 'gpu:1' -> 'cuda:0' / 'cuda:0' / 'cuda:1' / 'cuda:1'; 'cpu', 'mps' stay."""
    s = name.strip().lower()
    if s.isdigit():
        return f"cuda:{int(s)}"
    if s in ("cuda", "gpu"):
        return "cuda:0"
    if s.startswith(("cuda:", "gpu:")) and s.split(":", 1)[1].isdigit():
        return f"cuda:{int(s.split(':', 1)[1])}"
    if s in ("cpu", "mps"):
        return s
    raise ConfigError(f"unknown device {name!r} in --max-memory; use cuda:N, cpu or mps (e.g. cuda:0=8GiB)")


def parse_max_memory(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, int]:
    """--max-memory cuda:0=8GiB --max-memory cpu=100GiB (or the SDK dict) -> {"cuda:0": bytes, "cpu": bytes}."""
    if not items:
        return {}
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        for item in items:
            if "=" not in item:
                raise ConfigError(f"--max-memory expects DEVICE=SIZE (e.g. cuda:0=8GiB), got {item!r}")
            k, v = item.split("=", 1)
            pairs.append((k, v))
    out: dict[str, int] = {}
    for k, v in pairs:
        dev = normalize_device(k)
        if dev in out:
            raise ConfigError(f"--max-memory names {dev} twice")
        out[dev] = parse_bytes(v)
    return out


def device_budgets(
    inventory: Inventory, max_memory: Mapping[str, int] | None = None, igpu_fraction: float = 0.75
) -> tuple[DeviceBudget, ...]:
    """Usable capacity per device, GPUs in ordinal order then the CPU.

    GPU budget = min(free, --max-memory cap); a unified-memory GPU is also capped to igpu_fraction of system
    RAM (on macOS to iogpu.wired_limit_mb when set), and the CPU then gets only what that share leaves, so
    shared memory is never counted twice. Each capacity is the budget minus a safety margin.

    A --max-memory cap bounds everything the process holds on the device, its CUDA context included: a capped
    CUDA budget is min(free + the context already paid, cap) and its row counts the context (the CUDA_CONTEXT
    estimate), so weights + KV + activations + graphs + staging + context stay within the cap.
    """
    caps = dict(max_memory or {})
    known = {g.device for g in inventory.gpus} | {"cpu"}
    for dev in caps:
        if dev not in known:
            have = ", ".join(sorted(known))
            raise UnknownDeviceError(
                f"--max-memory names {dev}, which this machine does not have (devices: {have})"
            )
    budgets: list[DeviceBudget] = []
    shared = 0  # system RAM promised to unified GPUs
    for g in inventory.gpus:
        budget = g.free_bytes
        if g.unified:
            share = g.wired_limit_bytes or int(inventory.cpu.total_bytes * igpu_fraction)
            budget = min(budget, share)
        context_included = g.context_included
        if g.device in caps:
            if g.kind == "cuda" and context_included:  # the process total: what is free + its context
                budget += CUDA_CONTEXT_BYTES
            budget, context_included = min(budget, caps[g.device]), g.kind != "cuda"
        if g.unified:
            shared += budget
        budgets.append(make_budget(g.device, budget, context_included, g.device in caps))
    cpu = inventory.cpu.available_bytes
    if shared:
        cpu = max(0, min(cpu - shared, inventory.cpu.total_bytes - shared))
    budgets.append(make_budget("cpu", min(cpu, caps.get("cpu", cpu)), capped="cpu" in caps))
    return tuple(budgets)


# ------------------------------------------------------------------ plans


@dataclass(frozen=True)
class DeviceRow(ByteBudget):
    device: str
    layers: tuple[int, ...]  # layers that run here (their KV cache and activations are here)
    has_embed: bool
    has_head: bool
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    other_bytes: int  # fixed reserves; on a GPU that streams layers, its staging buffers too
    capacity_bytes: int
    budget_bytes: int
    # a GPU: which of `layers` are streamed (weights in CPU memory); the CPU: whose weights it holds for them
    streamed: tuple[int, ...] = ()
    capped: bool = False  # budget_bytes is the user's --max-memory: the KV pool stays inside it too
    has_vision: bool = False  # a vision model's tower and projector run here
    experts: tuple[int, ...] = ()  # MoE: layers running elsewhere whose experts are held and computed here


@dataclass(frozen=True)
class Plan:
    device_map: DeviceMap
    rows: tuple[DeviceRow, ...]
    fits: bool
    verdict: str
    model: str = "model"
    params: Mapping[str, Any] = field(default_factory=dict)
    manual: bool = False
    notes: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()  # what would make it fit (only when it does not)
    parallel: Any = None  # tensor_parallel.TPPlan: the tensor-parallel decision (None: not considered)
    vision: Mapping[str, Any] | None = None  # vision models: the vision stage's bytes (`vision_summary`)

    @property
    def tensor_parallel(self) -> int:
        return self.parallel.size if self.parallel is not None else 1

    @property
    def num_layers(self) -> int:
        return self.device_map.num_layers

    def row(self, device: str) -> DeviceRow:
        return next(r for r in self.rows if r.device == device)


def device_row(dm: DeviceMap, req: Requirements, b: DeviceBudget) -> DeviceRow:
    """What the map puts on one device, in bytes. Streamed layers: weights (pinned) on the CPU; KV cache,
    activations and staging buffers on the GPU that runs them."""
    layers = tuple(dm.layers_on(b.device))
    has_embed, has_head = dm.embed == b.device, dm.head == b.device
    has_vision = bool(req.vision_weight) and dm.stage_device("vision") == b.device
    if b.kind == "cpu":
        streamed = tuple(dm.streamed)
        weighed = layers + streamed
    else:
        streamed = tuple(i for i in layers if i in dm.streamed)
        weighed = tuple(i for i in layers if i not in dm.streamed)
    weight = sum(req.layer_bytes(i, b.kind) for i in weighed)  # a GGUF's kept blocks: per device kind
    split = set(dm.split_experts())  # MoE: a layer's experts on another device than its attention
    experts = tuple(i for i in sorted(split) if dm.experts[i] == b.device)
    weight += sum(req.expert_weight(i) for i in experts) - sum(
        req.expert_weight(i) for i in weighed if i in split
    )
    if b.kind == "cpu" and dm.stream_gpu() is None:  # CPU layers keep prompt copies (quant/formats.py)
        weight += sum(req.cpu_extra(i) for i in layers)
    weight += req.embed_bytes(b.kind) if has_embed else 0
    weight += req.head_weight_on(dm.head, dm.embed) if has_head else 0
    weight += req.vision_weight if has_vision else 0
    used = bool(layers) or has_embed or has_head or has_vision or bool(experts)
    staging = 0
    if b.kind != "cpu" and dm.stream_gpu() == b.device:
        cpu_layers = dm.layers_on("cpu")  # streamed too in long prefills, through the same buffers
        staging = req.stream_staging(streamed, cpu_layers)
    kv = sum(req.layer_kv[i] for i in layers)
    # on a CPU that holds every layer, the weights loaded after the largest staged tensor are not there yet
    after = req.load_staging_after if b.kind == "cpu" and len(layers) == req.num_layers else 0
    # every weight in CPU memory (a GGUF's kept blocks are copied out of the file, not staged in f32)
    all_cpu = b.kind == "cpu" and len(layers) == req.num_layers and has_embed and has_head
    all_cpu = (
        all_cpu
        and dm.stream_gpu() is None
        and (has_vision or not req.vision_weight)
        and not dm.split_experts()
    )
    if all_cpu and req.load_staging_cpu is not None:
        after = req.load_staging_cpu_after
    act = req.activation(b.kind, bool(layers), has_head, has_embed, bool(experts))
    act += req.vision_activation if has_vision else 0
    return DeviceRow(
        device=b.device,
        layers=layers,
        has_embed=has_embed,
        has_head=has_head,
        weight_bytes=weight,
        kv_cache_bytes=kv,
        activation_bytes=act,
        other_bytes=req.other(
            b.kind, used, b.context_included, len(streamed) < len(layers), kv + act + after, all_cpu
        )
        + staging,
        capacity_bytes=b.capacity_bytes,
        budget_bytes=b.budget_bytes,
        streamed=streamed,
        capped=b.capped,
        has_vision=has_vision,
        experts=experts,
    )


def _budgets_for(dm: DeviceMap, budgets: tuple[DeviceBudget, ...]) -> tuple[DeviceBudget, ...]:
    """The budgets, plus a zero budget for any device the map names that the inventory lacks."""
    known = {b.device for b in budgets}
    extra = tuple(make_budget(d, 0) for d in dm.devices() if d not in known)
    return budgets + extra


def evaluate(dm: DeviceMap, req: Requirements, budgets: tuple[DeviceBudget, ...]) -> tuple[DeviceRow, ...]:
    return tuple(device_row(dm, req, b) for b in _budgets_for(dm, budgets))


def _fits_on(dm: DeviceMap, req: Requirements, b: DeviceBudget) -> bool:
    return device_row(dm, req, b).fits


def _fill_gpu(req: Requirements, b: DeviceBudget, start: int) -> int:
    """How many layers from `start` fit on GPU `b` with their KV cache, the activation reserve and reserves."""
    fixed = req.activation(b.kind, True, False, False) + req.other(b.kind, True, b.context_included, True)
    room = b.capacity_bytes - fixed
    n = 0
    for i in range(start, req.num_layers):
        room -= req.layer_bytes(i, b.kind) + req.layer_kv[i]
        if room < 0:
            break
        n += 1
    return n


def _place_layers(req: Requirements, gpus: list[DeviceBudget]) -> tuple[str, ...]:
    layers: list[str] = []
    for b in gpus:
        layers += [b.device] * _fill_gpu(req, b, len(layers))
    return tuple(layers) + ("cpu",) * (req.num_layers - len(layers))


def _place_part(
    dm: DeviceMap, req: Requirements, gpus: list[DeviceBudget], part: str, first: str
) -> DeviceMap:
    """Move `part` ("head" or "embed") to the first GPU (preferring `first`) where it fits, else leave it."""
    order = sorted(gpus, key=lambda b: b.device != first)
    for b in order:
        candidate = dataclasses.replace(dm, **{part: b.device})
        if _fits_on(candidate, req, b):
            return candidate
    return dm


def _place_vision(req: Requirements, gpus: list[DeviceBudget]) -> str | None:
    """Rule 0 (vision models): the tower goes to the first GPU that holds it with its activations; None for
    a text-only model, "cpu" when no GPU can."""
    if not req.vision_weight:
        return None
    for b in gpus:
        alone = DeviceMap(layers=("cpu",) * req.num_layers, embed="cpu", head="cpu", vision=b.device)
        if _fits_on(alone, req, b):
            return b.device
    return "cpu"


def place_auto(req: Requirements, budgets: tuple[DeviceBudget, ...]) -> DeviceMap:
    """The automatic DeviceMap (rules in the module docstring). Deterministic."""
    n = req.num_layers
    gpus = [b for b in budgets if b.kind != "cpu"]
    experts = ("cpu",) * n if req.layer_experts else ()
    if not gpus:
        cpu = DeviceMap.single("cpu", n)
        return dataclasses.replace(cpu, vision="cpu" if req.vision_weight else None, experts=experts)
    vision = _place_vision(req, gpus)
    whole = dataclasses.replace(DeviceMap.single(gpus[0].device, n), vision=vision and gpus[0].device)
    if experts:
        whole = dataclasses.replace(whole, experts=whole.layers)
    if _fits_on(whole, req, gpus[0]):
        return whole
    if experts:
        return place_experts(req, gpus)  # (no MoE model has a vision tower yet)
    # the tower first: the layers fill what it leaves (larger images move layers off the GPU, not it)
    room = [
        dataclasses.replace(
            b, capacity_bytes=max(0, b.capacity_bytes - req.vision_weight - req.vision_activation)
        )
        if b.device == vision
        else b
        for b in gpus
    ]
    layers = _place_layers(req, room)
    dm = DeviceMap(layers=layers, embed="cpu", head="cpu", vision=vision)
    gpu_layers = [d for d in layers if d != "cpu"]
    dm = _place_part(dm, req, gpus, "head", gpu_layers[-1] if gpu_layers else gpus[0].device)
    if req.tied_weight and dm.head != "cpu":
        dm = _place_part(dm, req, [b for b in gpus if b.device == dm.head], "embed", dm.head)
    else:
        dm = _place_part(dm, req, gpus, "embed", layers[0] if n else gpus[0].device)
    return dm


def place_experts(req: Requirements, gpus: list[DeviceBudget], cpu_experts: int | None = None) -> DeviceMap:
    """MoE placement (rule 5 of the module docstring): every layer's attention, router and norms (with its KV
    cache) on the GPUs first, then the head, then experts layer by layer from layer 0 (so the experts of the
    last layers spill first), then the embeddings. A decode token reads k of E experts per layer (8 of 128
    for Qwen3-30B-A3B: 6% of a layer's expert bytes) but all of the head and attention, so a GPU byte is
    worth more there. `cpu_experts` (--n-cpu-moe N): the experts of layers 0..N-1 go to the CPU and every
    other stage stays where the GPU placement puts it (checked, not shrunk, like a manual map)."""
    n = req.num_layers
    dense = dataclasses.replace(
        req, layer_weight=tuple(w - req.expert_weight(i) for i, w in enumerate(req.layer_weight))
    )
    layers = _place_layers(dense, gpus) if cpu_experts is None else (gpus[0].device,) * n
    dm = DeviceMap(layers=layers, embed="cpu", head="cpu", experts=("cpu",) * n)
    if cpu_experts is not None:
        experts = ("cpu",) * cpu_experts + layers[cpu_experts:]
        return dataclasses.replace(dm, experts=experts, head=layers[-1], embed=layers[0])
    gpu_layers = [d for d in layers if d != "cpu"]
    dm = _place_part(dm, req, gpus, "head", gpu_layers[-1] if gpu_layers else gpus[0].device)
    by_name = {b.device: b for b in gpus}
    for i, d in enumerate(layers):
        if d != "cpu":
            candidate = dataclasses.replace(dm, experts=dm.experts[:i] + (d,) + dm.experts[i + 1 :])
            if _fits_on(candidate, req, by_name[d]):
                dm = candidate
    if req.tied_weight and dm.head != "cpu":
        return _place_part(dm, req, [b for b in gpus if b.device == dm.head], "embed", dm.head)
    return _place_part(dm, req, gpus, "embed", layers[0])


# ------------------------------------------------------------------ offload: stream or compute on the CPU


def _gpu_for_streaming(dm: DeviceMap, gpus: list[DeviceBudget]) -> DeviceBudget:
    """The GPU that runs streamed layers: the one holding the last GPU layer (next to the CPU layers)."""
    on_gpu = [d for d in dm.layers if d != "cpu"]
    name = on_gpu[-1] if on_gpu else gpus[0].device
    return next(b for b in gpus if b.device == name)


def _shrink(budgets: tuple[DeviceBudget, ...], device: str, nbytes: int) -> tuple[DeviceBudget, ...]:
    return tuple(
        dataclasses.replace(b, capacity_bytes=max(0, b.capacity_bytes - nbytes)) if b.device == device else b
        for b in budgets
    )


def _choose_streamed(req: Requirements, offloaded: list[int], mode: str, bw: Bandwidths) -> tuple[int, ...]:
    if mode == "stream":
        return tuple(offloaded)
    return best_split(req.cpu_layer_weight, offloaded, bw, layer_params=req.layer_params or None).streamed


def _streaming_map(
    req: Requirements, budgets: tuple[DeviceBudget, ...], gpu: DeviceBudget, mode: str, bw: Bandwidths
) -> DeviceMap | None:
    """Place layers on the GPUs with room kept for streaming (staging buffers, the streamed layers' KV),
    then stream the CPU-resident layers the mode asks for. None when nothing would be streamed."""
    reserve = req.stream_staging(list(range(req.num_layers)))
    head_on_gpu = False
    dm = last = place_auto(req, budgets)
    for _ in range(12):  # the reserve depends on how many layers end up streamed: a few rounds settle it
        dm = place_auto(req, _shrink(budgets, gpu.device, reserve))
        if head_on_gpu:
            dm = dataclasses.replace(dm, head=gpu.device)
        elif dm.head == "cpu":
            # the head before one more resident layer: a layer can be streamed (8 ms for a Llama-3-8B layer
            # over PCIe Gen5), the head's 1 GB GEMV on the CPU would cost ~27 ms per token
            reserve += req.head_weight_on(gpu.device, dm.embed) + req.head_activation
            head_on_gpu = True
            continue
        offloaded = dm.layers_on("cpu")
        streamed = _choose_streamed(req, offloaded, mode, bw)
        if not streamed:
            return None
        layers = tuple(gpu.device if i in streamed else d for i, d in enumerate(dm.layers))
        dm = dataclasses.replace(dm, layers=layers, streamed=streamed)
        row = device_row(dm, req, gpu)
        if row.fits:
            return dm
        # grow the reserve by the deficit; by a whole layer when the last round's growth moved nothing (a
        # deficit smaller than what place_auto rounds to, e.g. 3 MB with int4 layers, would repeat forever)
        step = -row.headroom_bytes
        if dm == last:
            step = max(step, max(req.layer_weight) + max(req.layer_kv))
        reserve += step
        last = dm
    return dm


def _prefill_streaming_map(
    req: Requirements, budgets: tuple[DeviceBudget, ...], gpu: DeviceBudget, bw: Bandwidths
) -> DeviceMap | None:
    """The automatic map with room kept on `gpu` to stream the CPU-computed layers for long prompts (two
    staging buffers and one layer's KV window), when the planned prompts reach the cost model's threshold
    for that. Without it a long prompt's every chunk is computed on the CPU: about a second per 2048-token
    chunk and 8B layer, where streaming the layer costs ~10 ms (a 4 GiB 8B plan with 8 prompts of 8k tokens
    ran out of a 240 s limit). None when no layer is computed on the CPU or the prompts are short."""
    staging = req.stream_staging((), list(range(req.num_layers)))
    maps = []
    for head in (False, True):  # as place_auto leaves it, or the head kept on the GPU before a layer
        reserve = staging + (req.head_weight_on(gpu.device, "cpu") + req.head_activation if head else 0)
        dm = place_auto(req, _shrink(budgets, gpu.device, reserve))
        dm = dataclasses.replace(dm, prefill_stream=gpu.device, head=gpu.device if head else dm.head)
        if dm.layers_on("cpu") and _fits(dm, req, budgets):
            maps.append(dm)
    if not maps:
        return None
    dm = min(maps, key=lambda m: _decode_seconds(m, req, bw))
    cpu = dm.layers_on("cpu")
    at = gpu_prefill_tokens(req.cpu_layer_weight, (), cpu, bw, layer_params=req.layer_params or None)
    return dm if at is not None and req.prefill_tokens >= at else None


def offload_estimate(dm: DeviceMap, req: Requirements, bw: Bandwidths, tokens: int = 1) -> StepEstimate:
    """Predicted time of the CPU-resident layers in a step of `tokens` tokens under this map."""
    return step_seconds(
        req.cpu_layer_weight, dm.streamed, dm.layers_on("cpu"), tokens, bw, req.layer_params or None
    )


def _decode_seconds(dm: DeviceMap, req: Requirements, bw: Bandwidths) -> float:
    """Offloaded layers plus, when the head was left on the CPU, its GEMV there (1 GB for Llama-3-8B: the
    largest single matrix, ~18 ms per token at 58 GB/s)."""
    head = req.head_weight_on(dm.head, dm.embed) / (bw.cpu_gemv_gbps * 1e9) if dm.head == "cpu" else 0.0
    return offload_estimate(dm, req, bw).seconds + head


def place_offload(
    req: Requirements, budgets: tuple[DeviceBudget, ...], mode: str = "auto", bw: Bandwidths | None = None
) -> DeviceMap:
    """The automatic map, then how its CPU-resident layers run (module cost_model.py):
    "cpu": all computed on the CPU; "stream": all streamed to a GPU; "auto": the split with the fastest
    predicted decode, which may be all-CPU (streaming costs GPU room for staging buffers, so the GPU holds
    fewer layers; the comparison counts that); but when the planned prompts are long enough that the cost
    model streams CPU layers for them, only maps that can (`_prefill_streaming_map`)."""
    if mode not in OFFLOAD_MODES:
        raise ConfigError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
    bw = bw or Bandwidths()
    base = place_auto(req, budgets)
    gpus = [b for b in budgets if b.kind == "cuda"]
    if mode == "cpu" or not gpus or not base.layers_on("cpu") or req.layer_experts:
        return base  # MoE: experts computed on the CPU (not streamed: a token needs few of them)
    gpu = _gpu_for_streaming(base, gpus)
    streaming = _streaming_map(req, budgets, gpu, mode, bw)
    if mode == "stream":
        return streaming or base
    # auto: the fastest decode among the maps that fit (streamed layers keep their KV and staging on the GPU)
    # and, when the planned prompts are long, can stream their CPU layers for the prompts
    candidates = [m for m in (base, streaming) if m is not None and _fits(m, req, budgets)]
    prompts = _prefill_streaming_map(req, budgets, gpu, bw)
    if prompts is not None:
        candidates = [m for m in candidates if m.streamed] + [prompts]
    if not candidates:
        return base
    return min(candidates, key=lambda m: _decode_seconds(m, req, bw))


def _notes(dm: DeviceMap, rows: tuple[DeviceRow, ...], req: Requirements) -> tuple[str, ...]:
    notes = list(req.notes)
    gpus_with_layers = [d for d in dm.devices() if d != "cpu" and dm.layers_on(d)]
    if len(gpus_with_layers) > 1:
        notes.append(TP_NOTE)
    cpu_layers = dm.layers_on("cpu")
    if cpu_layers and gpus_with_layers:
        notes.append(
            f"layers {format_layers(cpu_layers)} are computed on the CPU; their KV cache is in CPU memory"
        )
    split = dm.split_experts()
    if split:
        cpu = [i for i in split if dm.experts[i] == "cpu"]
        notes.append(
            f"experts of layers {format_layers(cpu)} ({sum(req.expert_weight(i) for i in cpu) / GiB:.2f} GiB) "
            "are in CPU memory and computed there (only the experts each token chooses); attention, router "
            "and KV cache of those layers stay on the GPU"
        )
    if dm.streamed:
        gpu = dm.layers[dm.streamed[0]]
        notes.append(
            f"layers {format_layers(dm.streamed)}: weights in pinned CPU memory, streamed to {gpu} each step "
            f"and computed there; their KV cache is on {gpu}"
        )
    return tuple(notes)


def _shortfalls(rows: tuple[DeviceRow, ...]) -> list[str]:
    return [
        f"{r.device} needs {r.total_bytes / GiB:.2f} GiB but has {r.capacity_bytes / GiB:.2f} GiB usable "
        f"(short by {-r.headroom_bytes / GiB:.2f} GiB)"
        for r in rows
        if not r.fits
    ]


def _verdict(dm: DeviceMap, rows: tuple[DeviceRow, ...], manual: bool) -> str:
    short = _shortfalls(rows)
    if short:
        what = "this manual device map does not fit" if manual else "does not fit, even with CPU offload"
        return f"{what}: " + "; ".join(short)
    if dm.is_single_device() and dm.embed != "cpu":
        return f"fits on {dm.embed}: the whole model stays there (no change)"
    if dm.is_single_device():
        return "fits on the CPU (no GPU)"
    return f"fits with offload: {placement_summary(rows)}"


def placement_summary(rows: tuple[DeviceRow, ...]) -> str:
    """'cuda:0: layers 0-26; cpu: layers 27-31 + embed + head', in the order of the rows (GPUs first)."""
    parts = []
    for r in rows:
        own = [i for i in r.layers if i not in r.streamed]
        what = [f"layers {format_layers(own)}" if len(own) > 1 else f"layer {own[0]}"] if own else []
        if r.streamed and r.device != "cpu":
            what.append(f"streamed {format_layers(r.streamed)}")
        if r.experts:
            what.append(f"experts of layers {format_layers(r.experts)}")
        what += [n for n, on in (("embed", r.has_embed), ("head", r.has_head)) if on]
        if what:
            parts.append(f"{r.device}: {' + '.join(what)}")
    return "; ".join(parts)


def make_plan(
    dm: DeviceMap,
    req: Requirements,
    budgets: tuple[DeviceBudget, ...],
    model: str = "model",
    params: Mapping[str, Any] | None = None,
    manual: bool = False,
) -> Plan:
    """Evaluate any DeviceMap against the budgets."""
    rows = evaluate(dm, req, budgets)
    fits = all(r.fits for r in rows)
    return Plan(
        dm, rows, fits, _verdict(dm, rows, manual), model, dict(params or {}), manual, _notes(dm, rows, req)
    )


def plan_auto(req: Requirements, budgets: tuple[DeviceBudget, ...], **kw: Any) -> Plan:
    """Automatic placement, evaluated. Never raises for not fitting: see `require_fit`."""
    return make_plan(place_auto(req, budgets), req, budgets, **kw)


def plan_manual(dm: DeviceMap, req: Requirements, budgets: tuple[DeviceBudget, ...], **kw: Any) -> Plan:
    """A user's map, evaluated. Not fitting is a warning (the user asked for it), not an error."""
    plan = make_plan(dm, req, budgets, manual=True, **kw)
    warn_if_manual_misfit(plan)
    return plan


def warn_if_manual_misfit(plan: Plan) -> None:
    if plan.manual and not plan.fits:
        log.warning("%s%s", plan.verdict, "".join(f"; {h}" for h in plan.hints))


def require_fit(plan: Plan) -> Plan:
    """Raise PlacementError (shortfall per device and what would help) when an automatic plan does not fit."""
    if not plan.fits and not plan.manual:
        raise PlacementError(failure_message(plan))
    return plan


def failure_message(plan: Plan) -> str:
    return plan.verdict + "".join(f"\n  - {h}" for h in plan.hints)


# ------------------------------------------------------------------ the whole pipeline


def params_dict(params: AutoDeviceMapParams, paged: bool, isq: int | None, dtype: str) -> dict[str, Any]:
    return {**dataclasses.asdict(params), "paged_attention": paged, "isq": isq, "dtype": dtype}


def _offload_notes(dm: DeviceMap, req: Requirements, bw: Bandwidths) -> tuple[str, ...]:
    if not dm.layers_on("cpu") and not dm.streamed:
        return ()
    est = offload_estimate(dm, req, bw)
    notes = (
        f"offload: {len(dm.streamed)} layers streamed, {len(dm.layers_on('cpu'))} computed on the CPU; "
        f"predicted {est.seconds * 1e3:.0f} ms per decode step for them "
        f"(copies {est.copy_seconds * 1e3:.0f} ms, compute {est.compute_seconds * 1e3:.0f} ms; {bw.source})",
    )
    cpu = dm.layers_on("cpu")
    at = gpu_prefill_tokens(req.cpu_layer_weight, dm.streamed, cpu, bw, layer_params=req.layer_params or None)
    if cpu and dm.stream_gpu() is not None and at is not None:
        notes += (
            f"offload: steps of {at}+ tokens stream the CPU-computed layers to {dm.stream_gpu()} too, when that "
            "beats the CPU with the K/V each such layer then copies from CPU memory counted (long prompts)",
        )
    return notes


def plan_model(
    config: ModelConfig,
    params: AutoDeviceMapParams,
    budgets: tuple[DeviceBudget, ...],
    dtype: str,
    tensors: Mapping[str, TensorLike] | None = None,
    isq: int | None = None,
    paged: bool = True,
    device_map: DeviceMap | None = None,
    model: str = "model",
    offload: str = "cpu",
    bandwidths: Bandwidths | None = None,
    n_cpu_moe: int | None = None,
    keep: GGUFKeep | None = None,
) -> Plan:
    """Estimate, place (automatically, or check `device_map`), and when it does not fit add what would help.
    `offload` ("auto", "cpu", "stream") and `bandwidths` decide how CPU-resident layers run (automatic maps
    only; a manual map's CPU layers are computed on the CPU). The default here is "cpu", the plain memory
    plan; `resolve.plan_for_source`, the users' path, defaults to "auto". `n_cpu_moe` (MoE models): the
    experts of layers 0..N-1 in CPU memory, everything else on the GPU (`cpu_moe_map`), checked like a
    manual map. `keep`: a GGUF's default mode, whose block-quantized weights each device holds in its own form
    (quant/formats.gguf_projection_nbytes; not with ISQ, which the hints may try)."""
    manual = device_map is not None or n_cpu_moe is not None
    bw = bandwidths or Bandwidths()

    def place(p: AutoDeviceMapParams, q: int | None) -> tuple[DeviceMap, Requirements]:
        """The placement this plan uses, for any mapping parameters (the hints try others)."""
        req = requirements(config, p, dtype, tensors, q, paged, keep)
        if n_cpu_moe is not None:
            return cpu_moe_map(n_cpu_moe, req, budgets, device_map), req
        return (device_map if manual else place_offload(req, budgets, offload, bw)), req

    dm, req = place(params, isq)
    plan = make_plan(dm, req, budgets, model, params_dict(params, paged, isq, dtype), manual)
    plan = dataclasses.replace(plan, vision=vision_summary(dm, req, params))
    plan = dataclasses.replace(plan, notes=plan.notes + _offload_notes(dm, req, bw))
    if not plan.fits:
        hints = suggestions(params, isq, lambda p, q: _fits(*place(p, q), budgets))
        if offload == "stream" and not manual and _fits(place_offload(req, budgets, "cpu", bw), req, budgets):
            hints = (
                "would fit with --offload cpu or auto: streamed layers keep their KV cache on the GPU",
            ) + hints
        plan = dataclasses.replace(plan, hints=hints)
    warn_if_manual_misfit(plan)
    return plan


def vision_summary(dm: DeviceMap, req: Requirements, params: AutoDeviceMapParams) -> dict[str, Any] | None:
    """The vision stage of a plan (`spillover plan` shows it as a row; `--json` under "vision")."""
    if not req.vision_weight:
        return None
    return {
        "device": dm.stage_device("vision"),
        "weight_bytes": req.vision_weight,
        "activation_bytes": req.vision_activation,
        "kv_cache_bytes": req.vision_kv,
        "images": params.max_num_images,
        "edge": params.max_image_length,
        "tokens": req.image_tokens // max(1, params.max_num_images),
    }


def cpu_moe_map(
    n: Any, req: Requirements, budgets: tuple[DeviceBudget, ...], manual: DeviceMap | None = None
) -> DeviceMap:
    """--n-cpu-moe N (llama.cpp's flag): the experts of the FIRST N layers in CPU memory, computed there; the
    rest of the model on GPU 0, or where a manual map (-n) puts it. Raises ConfigError for values that
    cannot apply."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"--n-cpu-moe must be a number of layers (0 or more), got {n!r}")
    if not req.layer_experts:
        raise ConfigError(
            "--n-cpu-moe applies to mixture-of-experts models (Qwen3-MoE, Mixtral); this model has no experts"
        )
    if n > req.num_layers:
        raise ConfigError(f"--n-cpu-moe {n} is more than the model's {req.num_layers} layers")
    if manual is not None:
        return dataclasses.replace(manual, experts=("cpu",) * n + manual.layers[n:])
    gpus = [b for b in budgets if b.kind != "cpu"]
    if not gpus:
        raise UnknownDeviceError(
            "--n-cpu-moe keeps the other experts on GPU 0, but no GPU is visible; omit it to run on the CPU"
        )
    return place_experts(req, gpus[:1], cpu_experts=n)


def _fits(dm: DeviceMap, req: Requirements, budgets: tuple[DeviceBudget, ...]) -> bool:
    return all(r.fits for r in evaluate(dm, req, budgets))


def suggestions(
    params: AutoDeviceMapParams,
    isq: int | None,
    fits: Callable[[AutoDeviceMapParams, int | None], bool],
) -> tuple[str, ...]:
    """What would make it fit: a shorter --max-seq-len, --max-batch-size 1, --isq 4, or more memory."""
    out: list[str] = []
    seq = params.max_seq_len // 2
    while seq >= 256:
        if fits(dataclasses.replace(params, max_seq_len=seq), isq):
            out.append(f"would fit with --max-seq-len {seq}")
            break
        seq //= 2
    if params.max_batch_size > 1 and fits(dataclasses.replace(params, max_batch_size=1), isq):
        out.append("would fit with --max-batch-size 1")
    if isq != 4 and fits(params, 4):
        out.append("would fit with --isq 4")
    if not out:
        out.append(
            "no single change fits it: lower --max-seq-len and --max-batch-size, use --isq 4, or add memory"
        )
    return tuple(out)

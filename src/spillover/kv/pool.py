"""How many KV blocks the PagedAttention pool gets.

The number of blocks is shared by all layers (a block id names the same token positions in every layer's
cache), so the device that can hold the fewest tokens decides. The rule, per device holding layers:

- CUDA without `--max-memory`: like vLLM's gpu_memory_utilization. Measured after the weights are loaded: of
  `fraction` x total memory, take away what is in use now (context, weights, other processes) and the
  activation, graph and workspace reserve the plan made for that device; the rest holds KV. Default 0.9.
- CUDA with `--max-memory DEV=X`: the same rule inside the budget: of `fraction` x X, take away what this
  process holds there now (torch's allocated bytes: the weights) and the plan's reserves for it (CUDA
  context, kernels, activations, graph pool, staging buffers). `--pa-memory-fraction` is then a fraction of
  the budget. Other processes' memory does not count against the budget (min(free, X) planned it already).
- CPU (and MPS, which shares system RAM): no fill. System RAM also holds the spilled weights, the
  activations and everything else on the machine, and the runner zero-fills the pool (every page is touched
  at once), so the default is the plan's reservation, raised to one sequence of the model's full context so
  that any prompt the model takes is accepted, and at most `CPU_KV_SHARE` of the RAM available now (the
  reservation wins over that cap). With `--max-memory cpu=X` also at most what X leaves after the planned
  weights and reserves. Use `--pa-context-len` for a bigger CPU pool. In a GPU+CPU map the CPU devices cap
  a fraction-sized pool the same way.
- `--pa-context-len N` replaces both: exactly N tokens; with a budget, N must fit in it (else a
  PlacementError that says how many tokens would fit).

Never smaller than the planner's reservation (max_batch_size sequences of max_seq_len tokens, whole
blocks each), so the mapping guarantee holds: what the plan said fits, fits. On a device with a budget the
reservation must also fit what is really left after loading (a PlacementError otherwise, not an
out-of-memory error later). `--no-paged-attn` gets exactly that reservation and no prefix sharing: a
contiguous cache per sequence is the same memory, and a separate contiguous code path is not worth having.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from spillover.errors import ConfigError, PlacementError
from spillover.placement.estimate import CUDA_CONTEXT_BYTES, CUDA_KERNELS_BYTES, GiB, kv_tokens_per_sequence

DEFAULT_GPU_MEMORY_FRACTION = 0.9
CPU_KV_SHARE = 0.2
"""Most of the currently available RAM a default CPU pool may take (unless the reservation needs more)."""


@dataclass(frozen=True)
class PoolSettings:
    paged: bool = True
    memory_fraction: float | None = None  # CUDA: share of device memory (or of the budget) for everything
    context_len: int | None = None  # tokens; overrides memory_fraction

    def __post_init__(self) -> None:
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"--pa-memory-fraction must be in (0, 1], got {self.memory_fraction}")
        if self.context_len is not None and self.context_len < 1:
            raise ConfigError(f"--pa-context-len must be a positive number of tokens, got {self.context_len}")
        if not self.paged and (self.memory_fraction is not None or self.context_len is not None):
            flag = "--pa-memory-fraction" if self.memory_fraction is not None else "--pa-context-len"
            raise ConfigError(
                f"{flag} sizes the PagedAttention pool, which --no-paged-attn turns off (the cache is then "
                "exactly --max-seq-len x --max-batch-size tokens); drop one of the two"
            )


@dataclass(frozen=True)
class DeviceMemory:
    """One device that holds layers, measured after the weights were loaded."""

    device: str
    kind: str  # "cuda", "cpu", "mps"
    total_bytes: int
    free_bytes: int
    reserved_bytes: (
        int  # activations, graphs, workspace and context the plan reserved on it, not allocated yet
    )
    kv_bytes_per_token: int  # K and V of one token over the layers on this device
    budget_bytes: int | None = None  # --max-memory for this device: a limit on this process there
    used_bytes: int = 0  # with a budget: what this process holds there now (the loaded weights)

    def budget_room(self, fraction: float = 1.0) -> int:
        """Bytes of KV that fit in `fraction` of the budget (budgeted devices only)."""
        assert self.budget_bytes is not None
        return int(fraction * self.budget_bytes) - self.used_bytes - self.reserved_bytes


def reservation_tokens(max_seq_len: int, max_batch_size: int, paged: bool = True) -> int:
    """The KV tokens the planner reserved: max_batch_size sequences of max_seq_len (whole blocks)."""
    return max_batch_size * kv_tokens_per_sequence(max_seq_len, paged)


def kv_pool_tokens(
    devices: Iterable[DeviceMemory],
    *,
    max_seq_len: int,
    max_batch_size: int,
    max_model_len: int,
    settings: PoolSettings = PoolSettings(),
) -> int:
    """Tokens of KV the pool holds (pure; see the module docstring for the rule). Raises PlacementError when
    a budget cannot hold the reservation or the requested --pa-context-len."""
    floor = reservation_tokens(max_seq_len, max_batch_size, settings.paged)
    devices = [d for d in devices if d.kv_bytes_per_token > 0]
    for d in devices:
        if d.budget_bytes is not None and d.budget_room() < floor * d.kv_bytes_per_token:
            raise PlacementError(_short(d, floor, "the KV reservation of --max-seq-len x --max-batch-size"))
    if not settings.paged:
        return floor
    if settings.context_len is not None:
        tokens = max(settings.context_len, floor)
        for d in devices:
            if d.budget_bytes is not None and d.budget_room() < tokens * d.kv_bytes_per_token:
                raise PlacementError(_short(d, tokens, f"--pa-context-len {settings.context_len}"))
        return tokens
    cuda = [d for d in devices if d.kind == "cuda"]
    fraction = settings.memory_fraction or DEFAULT_GPU_MEMORY_FRACTION
    if cuda:
        tokens = min(_cuda_tokens(d, fraction) for d in cuda)
    else:
        tokens = max_model_len
    for d in devices:
        if d.kind != "cuda":
            tokens = min(tokens, int(d.free_bytes * CPU_KV_SHARE) // d.kv_bytes_per_token)
            if d.budget_bytes is not None:
                tokens = min(tokens, max(0, d.budget_room()) // d.kv_bytes_per_token)
    return max(tokens, floor)


def _cuda_tokens(d: DeviceMemory, fraction: float) -> int:
    if d.budget_bytes is not None:
        return max(0, d.budget_room(fraction)) // d.kv_bytes_per_token
    in_use = d.total_bytes - d.free_bytes
    room = int(fraction * d.total_bytes) - in_use - d.reserved_bytes
    return max(0, room) // d.kv_bytes_per_token


def _short(d: DeviceMemory, tokens: int, what: str) -> str:
    room = max(0, d.budget_room())
    return (
        f"{what} needs {tokens} tokens of KV cache on {d.device} ({tokens * d.kv_bytes_per_token / GiB:.2f} GiB), "
        f"but its --max-memory budget of {d.budget_bytes / GiB:.2f} GiB leaves {room / GiB:.2f} GiB after "
        f"the weights ({d.used_bytes / GiB:.2f} GiB) and the planned reserves ({d.reserved_bytes / GiB:.2f} GiB): "
        f"room for {room // d.kv_bytes_per_token} tokens. Lower --pa-context-len, --max-seq-len or "
        "--max-batch-size, or raise --max-memory"
    )


def kv_pool_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def measure_devices(plan, device_map, config, dtype_bytes: int, token_bytes=None) -> list[DeviceMemory]:  # noqa: ANN001
    """DeviceMemory of each device holding layers, probed now (call after the weights are loaded).
    `token_bytes`: KV bytes per pool token of each layer (engine/build.py; default: K and V of every token)."""
    return _devices(plan, device_map, config, dtype_bytes, measured=True, token_bytes=token_bytes)


def planned_devices(plan, device_map, config, dtype_bytes: int, token_bytes=None) -> list[DeviceMemory]:  # noqa: ANN001
    """DeviceMemory of each budgeted device holding layers, from the plan alone (before loading: the
    planned weights stand for the loaded ones). `kv_pool_tokens` over these refuses, before any weight is
    read, a --pa-context-len that a budget cannot hold."""
    devs = _devices(plan, device_map, config, dtype_bytes, measured=False, token_bytes=token_bytes)
    return [d for d in devs if d.budget_bytes]


def _devices(
    plan, device_map, config, dtype_bytes: int, measured: bool, token_bytes=None
) -> list[DeviceMemory]:  # noqa: ANN001
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    token_bytes = token_bytes or [per_layer] * device_map.num_layers
    out = []
    for dev in device_map.devices():
        layers = [i for i, d in enumerate(device_map.layers) if d == dev]
        if not layers:
            continue
        kind = dev.split(":")[0]
        row = next((r for r in plan.rows if r.device == dev), None)
        reserved = (row.activation_bytes + row.other_bytes) if row is not None else 0
        budget = row.budget_bytes if row is not None and getattr(row, "capped", False) else None
        used = row.weight_bytes if budget is not None else 0
        total = free = 0
        if measured:
            total, free = _probe(dev, kind)
            if budget is not None and kind == "cuda":
                used = _allocated(dev)
        kv = sum(token_bytes[i] for i in layers)
        out.append(DeviceMemory(dev, kind, total, free, reserved, kv, budget, used))
    return out


def allocator_limits(plan, totals: Mapping[str, int]) -> dict[str, float]:  # noqa: ANN001
    """Per GPU with a --max-memory budget: the share of its memory (`totals`) that torch's caching allocator
    may hold, the budget less what lives outside the allocator (the CUDA context and kernel modules, as the
    plan counts them). Without the limit the allocator keeps freed blocks cached up to the whole GPU, so a
    run whose live tensors fit its plan could still hold more than the budget (measured: 20.7 GiB of device
    use under a 20 GiB budget, 32k-token prompt, with torch itself limited to 20 GiB). With it, the allocator
    returns cached blocks before it would cross the budget."""
    out = {}
    for r in plan.rows:
        if getattr(r, "capped", False) and r.device.startswith("cuda") and r.device in totals:
            room = max(0, r.budget_bytes - CUDA_CONTEXT_BYTES - CUDA_KERNELS_BYTES)
            out[r.device] = min(1.0, room / totals[r.device])
    return out


def limit_allocator(plan) -> dict[str, float]:  # noqa: ANN001
    """Apply `allocator_limits` with torch.cuda.set_per_process_memory_fraction; returns what was set. Under a
    budget the allocator also maps its segments as they grow (`expandable_segments:True`, unless the user set
    PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF): without that, transients that change size step by step
    leave freed blocks no later request fits, and torch's reserved memory grew 0.7 GiB past its allocated
    peak on the H200 grid (bf16, 32k prompt), which the budget then had to hold (estimate.ALLOCATOR_SLACK_BYTES)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    totals = {
        f"cuda:{i}": torch.cuda.get_device_properties(i).total_memory
        for i in range(torch.cuda.device_count())
    }
    limits = allocator_limits(plan, totals)
    if limits and not any(os.environ.get(v) for v in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    for dev, fraction in limits.items():
        torch.cuda.set_per_process_memory_fraction(fraction, torch.device(dev))
    return limits


def _allocated(dev: str) -> int:
    """Bytes torch's allocator has handed out on a GPU now (live tensors: the weights after loading)."""
    import torch

    return torch.cuda.memory_allocated(dev)


def _probe(dev: str, kind: str) -> tuple[int, int]:
    """(total, free) of one device now, through the placement inventory's probes."""
    from spillover.placement.inventory import probe_cpu, probe_cuda

    if kind == "cuda":
        gpu = next(g for g in probe_cuda() if g.device == dev)
        return gpu.total_bytes, gpu.free_bytes
    cpu = probe_cpu()  # CPU and MPS (unified: system RAM)
    return cpu.total_bytes, cpu.available_bytes

"""How many KV blocks the PagedAttention pool gets.

The number of blocks is shared by all layers (a block id names the same token positions in every layer's
cache), so the device that can hold the fewest tokens decides. The rule, per device holding layers:

- CUDA: like vLLM's gpu_memory_utilization. Measured after the weights are loaded: of `fraction` x total
  memory, take away what is in use now (context, weights, other processes) and the activation and workspace
  reserve the plan made for that device; the rest holds KV. Default fraction 0.9.
- CPU (and MPS, which shares system RAM): no fill. System RAM also holds the spilled weights, the
  activations and everything else on the machine, and the runner zero-fills the pool (every page is touched
  at once), so the default is the plan's reservation, raised to one sequence of the model's full context so
  that any prompt the model takes is accepted, and at most `CPU_KV_SHARE` of the RAM available now (the
  reservation wins over that cap). Use `--pa-context-len` for a bigger CPU pool. In a GPU+CPU map the CPU
  devices cap a fraction-sized pool the same way.
- `--pa-context-len N` replaces both: exactly N tokens.

Never smaller than the planner's reservation (max_batch_size sequences of max_seq_len tokens, whole
blocks each), so the mapping guarantee holds: what the plan said fits, fits. `--no-paged-attn` gets exactly
that reservation and no prefix sharing: a contiguous cache per sequence is the same memory, and a separate
contiguous code path is not worth having.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from spillover.errors import ConfigError
from spillover.placement.estimate import kv_tokens_per_sequence

DEFAULT_GPU_MEMORY_FRACTION = 0.9
CPU_KV_SHARE = 0.2
"""Most of the currently available RAM a default CPU pool may take (unless the reservation needs more)."""


@dataclass(frozen=True)
class PoolSettings:
    paged: bool = True
    memory_fraction: float | None = None  # CUDA: share of device memory for weights + activations + KV
    context_len: int | None = None  # tokens; overrides memory_fraction

    def __post_init__(self) -> None:
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"--pa-memory-fraction must be in (0, 1], got {self.memory_fraction}")
        if self.context_len is not None and self.context_len < 1:
            raise ConfigError(f"--pa-context-len must be a positive number of tokens, got {self.context_len}")


@dataclass(frozen=True)
class DeviceMemory:
    """One device that holds layers, measured after the weights were loaded."""

    device: str
    kind: str  # "cuda", "cpu", "mps"
    total_bytes: int
    free_bytes: int
    reserved_bytes: int  # activations and workspace the plan reserved on it, not allocated yet
    kv_bytes_per_token: int  # K and V of one token over the layers on this device


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
    """Tokens of KV the pool holds (pure; see the module docstring for the rule)."""
    floor = reservation_tokens(max_seq_len, max_batch_size, settings.paged)
    if not settings.paged:
        return floor
    if settings.context_len is not None:
        return max(settings.context_len, floor)
    devices = [d for d in devices if d.kv_bytes_per_token > 0]
    cuda = [d for d in devices if d.kind == "cuda"]
    fraction = settings.memory_fraction or DEFAULT_GPU_MEMORY_FRACTION
    if cuda:
        tokens = min(_cuda_tokens(d, fraction) for d in cuda)
    else:
        tokens = max_model_len
    for d in devices:
        if d.kind != "cuda":
            tokens = min(tokens, int(d.free_bytes * CPU_KV_SHARE) // d.kv_bytes_per_token)
    return max(tokens, floor)


def _cuda_tokens(d: DeviceMemory, fraction: float) -> int:
    in_use = d.total_bytes - d.free_bytes
    room = int(fraction * d.total_bytes) - in_use - d.reserved_bytes
    return max(0, room) // d.kv_bytes_per_token


def kv_pool_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def measure_devices(plan, device_map, config, dtype_bytes: int) -> list[DeviceMemory]:  # noqa: ANN001
    """DeviceMemory of each device holding layers, probed now (call after the weights are loaded)."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    out = []
    for dev in device_map.devices():
        n_layers = sum(1 for d in device_map.layers if d == dev)
        if n_layers == 0:
            continue
        kind = dev.split(":")[0]
        total, free = _probe(dev, kind)
        row = next((r for r in plan.rows if r.device == dev), None)
        reserved = (row.activation_bytes + row.other_bytes) if row is not None else 0
        out.append(DeviceMemory(dev, kind, total, free, reserved, per_layer * n_layers))
    return out


def _probe(dev: str, kind: str) -> tuple[int, int]:
    """(total, free) of one device now, through the placement inventory's probes."""
    from spillover.placement.inventory import probe_cpu, probe_cuda

    if kind == "cuda":
        gpu = next(g for g in probe_cuda() if g.device == dev)
        return gpu.total_bytes, gpu.free_bytes
    cpu = probe_cpu()  # CPU and MPS (unified: system RAM)
    return cpu.total_bytes, cpu.available_bytes

"""Whether to run tensor-parallel, over how many GPUs, and what each GPU then holds. Pure (no torch).

Rule (the promise in SPEC-device-mapping.md): with more than one CUDA GPU the model runs tensor-parallel
over all of them, unless `SPILLOVER_NO_NCCL=1`, the heads do not divide over the GPUs, or a GPU's share
(1/N of the sharded weights and KV cache, plus a full activation reserve and the communication buffers)
does not fit; then the automatic layer map (with CPU offload) is used, and the plan says why.
An explicit `--tensor-parallel-size N` (N <= the GPU count) is used as asked, and refused with a message
when it cannot work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from spillover.config import ModelConfig
from spillover.errors import ConfigError
from spillover.placement.estimate import ByteBudget, GiB, MiB, Requirements

NCCL_RESERVE_BYTES = 768 * MiB
"""Per GPU under tensor parallelism: NCCL's communicator buffers and its CUDA-graph pool entries (NCCL
allocates a few hundred MiB per communicator; its exact figure depends on the topology), with slack."""

ENV_NO_NCCL = "SPILLOVER_NO_NCCL"


def tp_problem(cfg: ModelConfig, world: int) -> str | None:
    """Why `cfg` cannot be split over `world` ranks (None when it can)."""
    if world < 1:
        return f"a tensor-parallel size must be at least 1, got {world}"
    if world > 1 and "vision" in cfg.extra:
        return "vision models do not run tensor-parallel yet"
    if cfg.extra.get("num_experts") and world > 1:
        return "mixture-of-experts models are not sharded yet (their experts go to CPU memory instead)"
    nh, nkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if nh % world:
        return f"{nh} attention heads do not divide over {world} GPUs"
    if nkv >= world and nkv % world:
        return f"{nkv} kv heads do not divide over {world} GPUs"
    if nkv < world and world % nkv:
        return f"{world} GPUs cannot share {nkv} kv heads evenly (replication needs GPUs % kv heads == 0)"
    if inter % world:
        return f"the intermediate size {inter} does not divide over {world} GPUs"
    return None


def kv_heads_per_rank(cfg: ModelConfig, world: int) -> int:
    """kv heads each rank holds: split when there are enough, else one replicated head."""
    return max(1, cfg.num_key_value_heads // world)


@dataclass(frozen=True)
class TPGpu(ByteBudget):
    """One GPU's share under tensor parallelism, in bytes (the same layout as planner.DeviceRow)."""

    device: str
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    other_bytes: int
    capacity_bytes: int
    budget_bytes: int


@dataclass(frozen=True)
class TPPlan:
    size: int  # ranks; 1 = not tensor-parallel
    reason: str  # why this size (shown by `plan` and `doctor`)
    gpus: tuple[TPGpu, ...] = ()  # each rank's share when size > 1 (or when it was tried and did not fit)

    @property
    def used(self) -> bool:
        return self.size > 1


def gpu_share(
    cfg: ModelConfig, req: Requirements, world: int, device: str, capacity: int, budget: int,
    context_included: bool = True,
) -> TPGpu:  # fmt: skip
    """What one of `world` GPUs holds: its slices of every layer, of the embeddings and of the head; its kv
    heads' cache; a whole activation reserve (hidden states are not split) and NCCL's buffers."""
    weights = sum(req.layer_weight) + req.embed_weight + req.head_weight
    weights = -(-weights // world)  # norms are replicated: a few KiB, inside the rounding of the rest
    kv_share = kv_heads_per_rank(cfg, world) / cfg.num_key_value_heads
    kv = int(sum(req.layer_kv) * kv_share)
    act = req.activation("cuda", True, True, True)
    other = req.other("cuda", True, context_included, graphs=True) + NCCL_RESERVE_BYTES  # decode graphs too
    return TPGpu(device, weights, kv, act, other, capacity, budget)


def plan_tensor_parallel(
    cfg: ModelConfig,
    req: Requirements,
    gpus: list[tuple[str, int, int]],  # (device, capacity, budget) of each CUDA GPU, ordinal order
    requested: int | None = None,
    environ: Mapping[str, str] | None = None,
    manual_map: bool = False,
) -> TPPlan:
    """Choose the tensor-parallel size (see the module docstring). Raises ConfigError for a requested size
    that cannot work (before anything is loaded)."""
    env = environ or {}
    n_gpus = len(gpus)
    if requested is not None and requested < 1:
        raise ConfigError(f"--tensor-parallel-size must be at least 1, got {requested}")
    if requested == 1:
        return TPPlan(1, "tensor parallelism off (--tensor-parallel-size 1)")
    if env.get(ENV_NO_NCCL, "").strip() not in ("", "0"):
        if requested:
            raise ConfigError(f"--tensor-parallel-size {requested} asks for NCCL but {ENV_NO_NCCL} is set")
        return TPPlan(1, f"{ENV_NO_NCCL}=1: tensor parallelism off, the automatic layer map is used")
    if manual_map:
        if requested:
            raise ConfigError("a manual device map (-n) and --tensor-parallel-size cannot be combined")
        return TPPlan(1, "a manual device map is used (no tensor parallelism)")
    if requested is not None and requested > n_gpus:
        raise ConfigError(
            f"--tensor-parallel-size {requested} needs {requested} CUDA GPUs but {n_gpus} are visible"
        )
    world = requested or n_gpus
    if world < 2:
        return TPPlan(1, "one GPU or none: no tensor parallelism")
    problem = tp_problem(cfg, world)
    if problem:
        if requested:
            raise ConfigError(f"cannot run tensor-parallel over {world} GPUs: {problem}")
        return TPPlan(1, f"not tensor-parallel: {problem}; the automatic layer map is used")
    shares = tuple(gpu_share(cfg, req, world, d, cap, bud) for d, cap, bud in gpus[:world])
    short = [s for s in shares if not s.fits]
    if short:
        s = short[0]
        why = (f"not tensor-parallel: {s.device} would need {s.total_bytes / GiB:.2f} GiB for its share but has "
               f"{s.capacity_bytes / GiB:.2f} GiB usable")  # fmt: skip
        if requested:
            raise ConfigError(why.replace("not tensor-parallel", f"--tensor-parallel-size {requested}"))
        return TPPlan(1, why + "; the automatic layer map (with CPU offload) is used", shares)
    return TPPlan(world, f"tensor-parallel over {world} GPUs (each holds 1/{world} of the weights)", shares)

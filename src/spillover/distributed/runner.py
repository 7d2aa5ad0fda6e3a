"""The tensor-parallel model runner: the ordinary ModelRunner over one rank's shard, in lockstep.

Rank 0 builds each step's inputs from the scheduler and broadcasts them before running the step; the other
ranks run the same step from the broadcast inputs. The layers' collectives (NCCL or gloo) keep the ranks in
step inside the forward pass; only rank 0 samples (every rank has the gathered logits).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from spillover.distributed.group import TPContext
from spillover.distributed.load import build_sharded
from spillover.distributed.shard import Collectives, shard_spec
from spillover.engine.runner import ModelRunner
from spillover.engine.step import StepInputs
from spillover.errors import DistributedError
from spillover.placement.device_map import DeviceMap
from spillover.placement.estimate import HEAD_MIN_ROWS, SAMPLER_MIN_ROWS

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def model_spec(source: Any, dtype: str, isq: int | None) -> dict[str, Any]:
    """What every rank needs to open the same model (picklable)."""
    import dataclasses

    if source.kind == "random":
        return {"random": dataclasses.asdict(source.config), "name": source.name, "dtype": dtype, "isq": isq}
    return {"model": source.path, "dtype": dtype, "isq": isq}


def open_spec(spec: dict[str, Any]) -> Any:
    from spillover.loading.source import open_source, random_source

    if spec.get("random") is not None:
        from spillover.config import ModelConfig

        return random_source(ModelConfig(**spec["random"]), spec.get("name", "random"))
    return open_source(spec["model"])


def build_shard(ctx: TPContext, source: Any, spec: dict[str, Any]) -> torch.nn.Module:
    sspec = shard_spec(source.config, ctx.rank, ctx.world)
    return build_sharded(source, sspec, ctx.comm, ctx.device, DTYPES[spec["dtype"]], spec.get("isq"))


def build_rank(ctx: TPContext, spec: dict[str, Any]) -> Any:
    """A worker: its shard, and a constructor of its runner once rank 0 sends the pool size."""
    model = build_shard(ctx, open_spec(spec), spec)
    return functools.partial(TPRunner, ctx, model, DTYPES[spec["dtype"]])


class TPRunner(ModelRunner):
    def __init__(
        self, ctx: TPContext, model: torch.nn.Module, dtype: torch.dtype, num_blocks: int, block_size: int,
        cuda_graphs: bool = True, grammars: Any = None, rings: int = 0, head_rows: int = HEAD_MIN_ROWS,
        sampler_rows: int = SAMPLER_MIN_ROWS, graph_sizes: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        dmap = DeviceMap.single(ctx.device, model.config.num_hidden_layers)
        # decode graphs capture the NCCL all-reduces; SPILLOVER_TP_CUDA_GRAPHS=0 runs eagerly instead
        graphs = (
            cuda_graphs and ctx.backend == "nccl" and os.environ.get("SPILLOVER_TP_CUDA_GRAPHS", "1") != "0"
        )
        super().__init__(model, dmap, dtype, num_blocks, block_size, graphs, rings, grammars=grammars,
                         head_rows=head_rows, sampler_rows=sampler_rows, graph_sizes=graph_sizes)  # fmt: skip
        self.ctx = ctx
        self._remote: StepInputs | None = None

    @property
    def can_overlap(self) -> bool:  # the next step's ids must be on the host to be broadcast
        return False

    def launch(self, sched, prev=None):  # noqa: ANN001, ANN201
        try:
            return super().launch(sched, prev)
        except DistributedError:
            self.ctx.close()
            raise
        except RuntimeError as e:  # gloo notices a dead peer and raises
            if self.ctx.rank == 0 and self.ctx.dead_worker() is None:
                raise
            self.ctx.close()
            raise DistributedError(self.ctx.failure or f"tensor-parallel step failed: {e}") from None

    def _inputs(self, sched, prev=None) -> StepInputs:  # noqa: ANN001
        if self._remote is not None:  # a worker: the inputs rank 0 broadcast
            step, self._remote = self._remote, None
            return step
        step = super()._inputs(sched, prev)
        self.ctx.send(("step", step))
        return step

    def _sample(self, sched, hidden, prev=None):  # noqa: ANN001, ANN202
        if sched is None:  # a worker: its part of every slice's logits (the head all-gathers them)
            self._logits(hidden, lambda first, logits: None)
            return None
        return super()._sample(sched, hidden, prev)

    def run_remote(self, step: StepInputs) -> None:
        self._remote = step
        self.launch(None)

    def capture_graphs(self, max_batch: int, max_len: int) -> int:
        if self.ctx.rank == 0 and self.graphs:
            self.ctx.send(("capture", (max_batch, max_len)))
        return super().capture_graphs(max_batch, max_len)


def start_rank0(world: int, source: Any, dtype: str, isq: int | None) -> tuple[TPContext, torch.nn.Module]:
    """Rank 0: start the group (spawning the other ranks on this machine), send the model, build its shard."""
    from spillover.distributed.group import start
    from spillover.placement.tensor_parallel import tp_problem

    problem = tp_problem(source.config, world)
    if problem:  # refused before any process starts or any weight is read
        raise DistributedError(f"cannot run tensor-parallel over {world} ranks: {problem}")
    ctx = start(world)
    spec = model_spec(source, dtype, isq)
    ctx.send(spec)
    try:
        model = build_shard(ctx, source, spec)
    except BaseException:
        ctx.close()
        raise
    return ctx, model


def make_runner(ctx: TPContext, model: torch.nn.Module, dtype: torch.dtype, num_blocks: int, block_size: int,
                cuda_graphs: bool = True, grammars: Any = None, rings: int = 0, head_rows: int = HEAD_MIN_ROWS,
                sampler_rows: int = SAMPLER_MIN_ROWS, graph_sizes: tuple[int, int] | None = None,
                ) -> TPRunner:  # fmt: skip
    """Rank 0's runner; the workers build theirs with the same pool (blocks, and sliding-window rings), the
    same head slices (their all-gathers pair up) and the same graph limits."""
    settings = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "cuda_graphs": cuda_graphs,
        "rings": rings,
        "head_rows": head_rows,
        "sampler_rows": sampler_rows,
        "graph_sizes": graph_sizes,
    }
    ctx.send(("runner", settings))
    return TPRunner(ctx, model, dtype, grammars=grammars, **settings)


__all__ = ["Collectives", "TPRunner", "make_runner", "start_rank0"]

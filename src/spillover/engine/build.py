"""From a loaded model and its plan to a running Engine: the KV pool size, the caches of each layer's KV spec,
the offload executor, the runner, the scheduler. `LLM` (and through it the CLI, the server and the tests)
builds engines here only."""

from __future__ import annotations

import logging
from typing import Any

import torch

from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.engine.engine import Engine
from spillover.engine.kv_cache import ring_len, ring_rings
from spillover.engine.offload import make_offload
from spillover.engine.runner import ModelRunner
from spillover.engine.scheduler import Scheduler
from spillover.kv.block_manager import BlockManager
from spillover.kv.pool import PoolSettings, kv_pool_blocks, kv_pool_tokens, measure_devices
from spillover.models.base import CausalLM
from spillover.placement.device_map import DeviceMap
from spillover.placement.estimate import KV_BLOCK_SIZE, MAX_BATCHED_TOKENS, head_rows, sampler_rows
from spillover.structured.grammar import Grammars

log = logging.getLogger(__name__)


def layer_token_bytes(
    arch: type[CausalLM], config: ModelConfig, dtype: torch.dtype, params: AutoDeviceMapParams
) -> list[int]:
    """KV bytes per token of the pool, per layer: a full-attention layer stores every token; a sliding one a
    ring of its window per sequence, i.e. per max_seq_len tokens of the pool (engine/kv_cache.py)."""
    b, max_seq_len = torch.finfo(dtype).bits // 8, params.max_seq_len
    out = []
    for s in arch.layer_specs(config):
        per = s.kv.bytes_per_token(b)
        w = s.kv.sliding_window
        out.append(per if w is None else -(-per * ring_len(w, KV_BLOCK_SIZE) // max_seq_len))
    return out


def build_engine(
    model: CausalLM,
    plan: Any,
    device_map: DeviceMap,
    dtype: torch.dtype,
    params: AutoDeviceMapParams,
    tokenizer: Any,
    max_model_len: int,
    pool: PoolSettings = PoolSettings(),
    cuda_graphs: bool = True,
    tp: Any = None,
) -> Engine:
    """The engine for a model loaded by `loading.loader.build_model` on `device_map` (the plan's), or for
    rank 0's shard when `tp` (distributed.group.TPContext) is given."""
    arch = type(model)
    token_bytes = layer_token_bytes(arch, model.config, dtype, params)
    pool_tokens = kv_pool_tokens(
        measure_devices(plan, device_map, model.config, torch.finfo(dtype).bits // 8, token_bytes),
        max_seq_len=params.max_seq_len, max_batch_size=params.max_batch_size, max_model_len=max_model_len,
        settings=pool,
    )  # fmt: skip
    num_blocks = kv_pool_blocks(pool_tokens, KV_BLOCK_SIZE)
    sliding = any(s.kv.sliding_window for s in arch.layer_specs(model.config))
    rings = ring_rings(pool_tokens, params.max_seq_len, params.max_batch_size) if sliding else 0
    eos = set(model.config.eos_token_id)
    if tokenizer is not None:
        eos |= set(tokenizer.eos_token_ids)
    grammars = Grammars(tokenizer, model.config.vocab_size, frozenset(eos))  # constrained decoding
    # what the plan reserved: the head's transients for its slices of rows (the runner slices bigger steps),
    # the decode graphs' pool for the mapping sizes (no graph beyond them is captured)
    mbs = params.max_batch_size
    planned = dict(head_rows=head_rows(mbs), sampler_rows=sampler_rows(mbs),
                   graph_sizes=(mbs, params.max_seq_len))  # fmt: skip
    if tp is not None:
        from spillover.distributed.runner import make_runner

        runner = make_runner(
            tp, model, dtype, num_blocks, KV_BLOCK_SIZE, cuda_graphs, grammars, rings, **planned
        )
    else:
        offload = make_offload(model, device_map)
        runner = ModelRunner(model, device_map, dtype, num_blocks, KV_BLOCK_SIZE, cuda_graphs, rings, offload,
                             grammars, **planned)  # fmt: skip
    # sliding-window rings hold no shared prefix: prefix sharing is off for such models
    # cross-attention models too: a token's K/V depends on images later in its prompt (models/mllama.py)
    cross = bool(getattr(arch, "cross_attention", False))
    blocks = BlockManager(num_blocks, KV_BLOCK_SIZE, pool.paged and not sliding and not cross)
    scheduler = Scheduler(blocks, MAX_BATCHED_TOKENS, **({"max_num_seqs": rings} if sliding else {}))
    context = min(max_model_len, num_blocks * KV_BLOCK_SIZE)  # a sequence never outgrows the pool
    return Engine(runner, scheduler, tokenizer, eos, context)

"""Tensor-parallel sharding as a transform on a built (meta-device) model, plus which slice of each checkpoint
tensor a rank loads.

Per decoder layer (Megatron layout, one all-reduce after attention and one after the MLP):
- qkv_proj, gate_up_proj: column-parallel (each rank holds its heads / its part of the intermediate size);
- o_proj, down_proj: row-parallel (each rank multiplies its part of the input; the partial sums are
  all-reduced);
- kv heads are split when there are at least as many kv heads as ranks; otherwise each kv head is
  replicated on the world/kv_heads ranks whose query heads use it;
- embed_tokens and lm_head: vocab-parallel (rows split; the embedding masks ids outside its range and
  all-reduces, the head all-gathers the logits).
Norms (and Qwen3's per-head q/k norms) are replicated. The model files know nothing of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spillover.config import ModelConfig
from spillover.errors import ConfigError
from spillover.placement.tensor_parallel import kv_heads_per_rank, tp_problem


@dataclass(frozen=True)
class ShardSpec:
    """What rank `rank` of `world` holds of a model with config `cfg`."""

    rank: int
    world: int
    heads: int  # query heads per rank
    kv_heads: int  # kv heads per rank (1 when replicated)
    kv_first: int  # first kv head of this rank
    inter: int  # intermediate size per rank
    vocab_per_rank: int  # ceil(vocab / world): every rank's logits are padded to this for the all-gather
    vocab_start: int
    vocab_end: int

    @property
    def head_first(self) -> int:
        return self.rank * self.heads


def shard_spec(cfg: ModelConfig, rank: int, world: int) -> ShardSpec:
    problem = tp_problem(cfg, world)
    if problem:
        raise ConfigError(f"cannot run tensor-parallel: {problem}; choose another --tensor-parallel-size")
    nkv, kv_heads = cfg.num_key_value_heads, kv_heads_per_rank(cfg, world)
    kv_first = rank * kv_heads if nkv >= world else rank // (world // nkv)  # replicated: the head its q use
    per = -(-cfg.vocab_size // world)
    v0 = min(rank * per, cfg.vocab_size)
    return ShardSpec(rank, world, cfg.num_attention_heads // world, kv_heads, kv_first,
                     cfg.intermediate_size // world, per, v0, min(v0 + per, cfg.vocab_size))  # fmt: skip


def local_config(cfg: ModelConfig, spec: ShardSpec) -> ModelConfig:
    """The config a rank's layers see: its own heads (the KV cache is sized from it)."""
    return cfg.replace(num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads)


# ---------------------------------------------------------------- slices of checkpoint tensors


@dataclass(frozen=True)
class Slice:
    source: str  # checkpoint tensor (HF name)
    dim: int | None  # None: the whole tensor
    start: int = 0
    end: int = 0


def param_slices(name: str, sources: list[str], cfg: ModelConfig, spec: ShardSpec) -> list[Slice]:
    """The slices of `sources` (the checkpoint tensors of parameter `name`, concatenated along dim 0) that
    rank `spec.rank` loads for it."""
    hd = cfg.head_dim
    if ".qkv_proj." in name:  # q, k, v: this rank's heads of each
        q, k, v = sources
        q0, kv0 = spec.head_first * hd, spec.kv_first * hd
        return [Slice(q, 0, q0, q0 + spec.heads * hd), Slice(k, 0, kv0, kv0 + spec.kv_heads * hd),
                Slice(v, 0, kv0, kv0 + spec.kv_heads * hd)]  # fmt: skip
    if ".gate_up_proj." in name:
        i0, i1 = spec.rank * spec.inter, (spec.rank + 1) * spec.inter
        return [Slice(s, 0, i0, i1) for s in sources]
    if ".o_proj.weight" in name:
        return [Slice(sources[0], 1, spec.head_first * hd, (spec.head_first + spec.heads) * hd)]
    if ".down_proj.weight" in name:
        return [Slice(sources[0], 1, spec.rank * spec.inter, (spec.rank + 1) * spec.inter)]
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return [Slice(sources[0], 0, spec.vocab_start, spec.vocab_end)]
    return [Slice(s, None) for s in sources]  # norms, biases of row-parallel layers: replicated


# ---------------------------------------------------------------- parallel modules


class Collectives:
    """The two collectives the layers need, over one process group."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, world: int) -> torch.Tensor:  # [N, C] -> [N, world * C]
        import torch.distributed as dist

        n, c = t.shape
        out = torch.empty((world * n, c), dtype=t.dtype, device=t.device)  # rank r's rows at r * n
        gather = (
            getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        )  # renamed in torch 2.12
        gather(out, t.contiguous(), group=self.group)
        return out.view(world, n, c).transpose(0, 1).reshape(n, world * c)


class RowParallel(nn.Module):
    """A linear layer over this rank's part of the input; the partial outputs are summed over the ranks."""

    def __init__(self, linear: nn.Module, comm: Collectives) -> None:
        super().__init__()
        self.linear, self.comm = linear, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in/world] -> [T, out]
        return self.comm.all_reduce(self.linear(x))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num: int, dim: int, spec: ShardSpec, comm: Collectives) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)  # [V_local, H]
        self.start, self.end, self.comm = spec.vocab_start, spec.vocab_end, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        mine = (ids >= self.start) & (ids < self.end)
        x = F.embedding((ids - self.start) * mine, self.weight) * mine[:, None].to(self.weight.dtype)
        return self.comm.all_reduce(x)


class VocabParallelHead(nn.Module):
    """lm_head over this rank's vocabulary rows; the logits of all ranks are gathered into [N, V]."""

    def __init__(self, linear: nn.Module, spec: ShardSpec, vocab: int, comm: Collectives) -> None:
        super().__init__()
        self.linear, self.comm, self.spec, self.vocab = linear, comm, spec, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        y = self.linear(x)  # [N, V_local]
        pad = self.spec.vocab_per_rank - y.shape[-1]
        if pad:
            y = F.pad(y, (0, pad))
        return self.comm.all_gather(y, self.spec.world)[:, : self.vocab]


def _meta_linear(inp: int, out: int, bias: bool) -> nn.Linear:
    with torch.device("meta"):
        return nn.Linear(inp, out, bias=bias)


def shard_model(model: nn.Module, spec: ShardSpec, comm: Collectives) -> nn.Module:
    """Turn a model built on the meta device into this rank's shard, in place (before any weight is loaded).

    Works on any decoder whose layers have `self_attn` (qkv_proj, o_proj, n_heads, n_kv) and `mlp`
    (gate_up_proj, down_proj, inter), and `embed_tokens` / `lm_head` at the top."""
    cfg = model.config
    hd, H = cfg.head_dim, cfg.hidden_size
    for layer in model.layers:
        at = layer.self_attn
        bias = at.qkv_proj.bias is not None
        at.n_heads, at.n_kv = spec.heads, spec.kv_heads
        at.qkv_proj = _meta_linear(H, (spec.heads + 2 * spec.kv_heads) * hd, bias)
        at.o_proj = RowParallel(_meta_linear(spec.heads * hd, H, False), comm)
        mlp = layer.mlp
        mlp.inter = spec.inter
        mlp.gate_up_proj = _meta_linear(H, 2 * spec.inter, False)
        mlp.down_proj = RowParallel(_meta_linear(spec.inter, H, False), comm)
    n = spec.vocab_end - spec.vocab_start
    with torch.device("meta"):
        model.embed_tokens = VocabParallelEmbedding(n, H, spec, comm)
    model.lm_head = VocabParallelHead(_meta_linear(H, n, False), spec, cfg.vocab_size, comm)
    model.full_config = cfg
    model.config = local_config(cfg, spec)
    model.shard = spec
    return model


def loaded_name(name: str) -> str:
    """A sharded model's parameter name -> the plain model's name (the wrappers add `.linear`)."""
    return name.replace(".linear.", ".")

"""Qwen3-MoE: the modules of the architecture models/arch/qwen3_moe.py describes (Qwen3 attention, a sparse MLP
of top-k routed SwiGLU experts, dense MLPs in `mlp_only_layers`). The experts are layers/moe.py's `Experts`,
a stage of their own.
"""

from __future__ import annotations

import torch
from torch import nn

from spillover.config import ModelConfig
from spillover.layers.moe import Experts, route_topk
from spillover.layers.norm import RMSNorm
from spillover.models.arch.qwen3_moe import MoE, Qwen3Moe, sparse_layers
from spillover.models.base import CausalLM, LayerInput
from spillover.models.llama import MLP, Attention


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        x = cfg.extra
        self.top_k, self.normalize = x["num_experts_per_tok"], x["norm_topk_prob"]
        self.gate = nn.Linear(cfg.hidden_size, x["num_experts"], bias=False)  # the router: [E, H]
        self.experts = Experts(x["num_experts"], cfg.hidden_size, x["moe_intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H]
        idx, w = route_topk(self.gate(x), self.top_k, self.normalize)  # [T, k] each
        return self.experts(x, idx, w)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if sparse else MLP(cfg)

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph can capture this layer's decode: experts with the layer, not quantized (the
        grouped path reads the expert counts on the host)."""
        if not isinstance(self.mlp, SparseMoE):
            return True
        ex = self.mlp.experts
        return ex.device == self.input_layernorm.weight.device and ex.gathers(1, ex.device)

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:  # x: [T, H]
        a = self.self_attn(self.input_layernorm(x), li)
        n, h = self.post_attention_layernorm(a, residual=x)  # h = x + a; n = norm(h)
        return h + self.mlp(n)


class MoECausalLM(MoE, CausalLM):
    """What Qwen3-MoE and Mixtral share: embed -> layers (attention + a dense or sparse MLP) -> head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, s) for s in sparse_layers(cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.embed_tokens(ids)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        return self.lm_head(self.norm(x))


class Qwen3MoeForCausalLM(Qwen3Moe, MoECausalLM):
    """Qwen3-MoE: its description (checkpoint names, config) on the shared MoE modules."""


MODEL = Qwen3MoeForCausalLM

"""Gemma 3 (text): the modules of the architecture models/arch/gemma3.py describes (sliding-window and global
layers, q/k norms, four norms per layer, GELU-tanh, scaled and tied embeddings).

- Gemma's RMSNorm multiplies by (1 + w); the loader stores 1 + w (`from_checkpoint`), so the plain RMSNorm
  (and its fused CUDA kernel) computes it.
- Attention scale query_pre_attn_scalar^-0.5; embeddings scaled by sqrt(hidden) in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from spillover.config import ModelConfig
from spillover.layers.norm import RMSNorm
from spillover.models import llama
from spillover.models.arch.gemma3 import Gemma3
from spillover.models.base import CausalLM, LayerInput


def attention(cfg: ModelConfig) -> llama.Attention:
    """Llama's attention with q/k norms ((1 + w), folded at load) and the scale query_pre_attn_scalar^-0.5."""
    return llama.Attention(cfg, qk_norm=True, scale=cfg.extra["query_pre_attn_scalar"] ** -0.5)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = attention(cfg)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = llama.MLP(cfg, act="gelu_tanh")
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:  # x: [T, H]
        if not x.is_cuda and (y := llama.cpu_fused(self, x, li)) is not None:  # GGUF blocks: one C call
            return y
        a = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), li))
        n, h = self.pre_feedforward_layernorm(a, residual=x)  # h = x + a; n = norm(h)
        return h + self.post_feedforward_layernorm(self.mlp(n))


class Gemma3ForCausalLM(Gemma3, CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.softcap = cfg.extra.get("final_logit_softcapping")

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        w = self.embed_tokens.weight
        return self.embed_tokens(ids) * torch.tensor(
            self.config.hidden_size**0.5, dtype=w.dtype, device=w.device
        )

    def head(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        logits = self.lm_head(self.norm(x))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


MODEL = Gemma3ForCausalLM

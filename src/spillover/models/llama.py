"""Llama-family decoders: Llama 2/3/3.1+, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm per head).

The modules of the architecture that models/arch/llama.py describes. Projections are fused (qkv_proj,
gate_up_proj); `param_sources` says which checkpoint tensors fill them. The engine drives the model stage by
stage (models/base.py): embed -> layers -> head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spillover.config import ModelConfig
from spillover.layers import triton_fused
from spillover.layers.attention import rope_attention
from spillover.layers.norm import RMSNorm
from spillover.models.arch.llama import Llama
from spillover.models.base import CausalLM, LayerInput
from spillover.quant.gguf_native import CPUDecodeLayer


class Attention(nn.Module):
    """Grouped-query attention with rope and a paged KV cache; q/k RMSNorm per head when `qk_norm` (Qwen3,
    Gemma 3). `scale`: the softmax scale (default head_dim^-0.5). Other architectures reuse it."""

    def __init__(self, cfg: ModelConfig, qk_norm: bool | None = None, scale: float | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm if qk_norm is None else qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.scale = self.hd**-0.5 if scale is None else scale

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:
        T, nh, nkv, hd = x.shape[0], self.n_heads, self.n_kv, self.hd
        qkv = self.qkv_proj(x).view(T, nh + 2 * nkv, hd)
        qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv :]  # [T, nh + nkv, hd], [T, nkv, hd]
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])], dim=1)
        o = rope_attention(qk, v, nh, li.cos, li.sin, li.k_cache, li.v_cache, li.meta, self.scale)
        return self.o_proj(o.reshape(T, nh * hd))  # o: [T, nh, hd]


class MLP(nn.Module):
    """Gated MLP, gate and up fused: down(act(gate) * up). `act`: "silu" (Llama) or "gelu_tanh" (Gemma 3)."""

    def __init__(self, cfg: ModelConfig, act: str = "silu") -> None:
        super().__init__()
        self.inter, self.act = cfg.intermediate_size, act
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # [T, 2I]
        if self.act == "silu" and triton_fused.usable(gu):
            return self.down_proj(triton_fused.silu_mul(gu))
        gate, up = gu.split(self.inter, dim=-1)  # [T, I] each
        a = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(a * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:  # x: [T, H]
        if not x.is_cuda and (y := cpu_fused(self, x, li)) is not None:  # GGUF blocks: C calls
            return y
        a = self.self_attn(self.input_layernorm(x), li)
        n, h = self.post_attention_layernorm(a, residual=x)  # h = x + a; n = norm(h)
        return h + self.mlp(n)


def cpu_fused(layer: nn.Module, x: torch.Tensor, li: LayerInput) -> torch.Tensor | None:
    """A CPU layer of GGUF blocks through quant/gguf_native.CPUDecodeLayer (decode steps: one C call; prompt
    rows: two around the attention), or None where it does not apply (the caller's torch path)."""
    fused = layer.__dict__.get("cpu_decode", False)
    if fused is False:
        fused = layer.__dict__["cpu_decode"] = CPUDecodeLayer.build(layer)
    return None if fused is None else fused(x, li)


class LlamaForCausalLM(Llama, CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.embed_tokens(ids)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V]
        return self.lm_head(self.norm(x))


MODEL = LlamaForCausalLM

"""Llama-family decoders: Llama 2/3/3.1+, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm per head).

Projections are fused (qkv_proj, gate_up_proj); `param_sources` says which checkpoint tensors fill them.
The runner drives the model layer by layer (layers may live on different devices): embed -> layers -> head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spillover.config import ModelConfig
from spillover.layers import triton_fused
from spillover.layers.attention import AttnMeta, paged_attention
from spillover.layers.norm import RMSNorm
from spillover.layers.rotary import apply_rotary

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LayerInput:
    """What one layer needs besides the hidden states; built by the runner per device per step."""

    cos: torch.Tensor  # [T, rot_dim]
    sin: torch.Tensor  # [T, rot_dim]
    meta: AttnMeta
    k_cache: torch.Tensor  # [slots, n_kv, hd]
    v_cache: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = self.hd**-0.5

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:
        T, nh, nkv, hd = x.shape[0], self.n_heads, self.n_kv, self.hd
        qkv = self.qkv_proj(x).view(T, nh + 2 * nkv, hd)
        qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv :]  # [T, nh + nkv, hd], [T, nkv, hd]
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :nh]), self.k_norm(qk[:, nh:])], dim=1)
        fused = triton_fused.usable(qk, v, li.cos, li.sin, li.k_cache, li.v_cache)
        if fused:  # one kernel: q, k rotated in place, k and v written to the cache
            q, k = qk.split([nh, nkv], dim=1)
            triton_fused.rope_and_cache(q, k, v, li.cos, li.sin, li.meta.slot_mapping, li.k_cache, li.v_cache)
        else:
            q, k = apply_rotary(qk, li.cos, li.sin).split([nh, nkv], dim=1)  # q and k rotated together
        o = paged_attention(q, k, v, li.k_cache, li.v_cache, li.meta, self.scale, kv_written=fused)
        return self.o_proj(o.reshape(T, nh * hd))  # o: [T, nh, hd]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # [T, 2I]
        if triton_fused.usable(gu):
            return self.down_proj(triton_fused.silu_mul(gu))
        gate, up = gu.split(self.inter, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:  # x: [T, H]
        a = self.self_attn(self.input_layernorm(x), li)
        n, h = self.post_attention_layernorm(a, residual=x)  # h = x + a; n = norm(h)
        return h + self.mlp(n)


class LlamaForCausalLM(nn.Module):
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


def param_sources(name: str, cfg: ModelConfig) -> list[str]:
    """Checkpoint tensors (HF names) that make up parameter `name`, concatenated along dim 0."""
    pre = "model."
    if name.startswith("layers."):
        if ".qkv_proj." in name:
            return [pre + name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        if ".gate_up_proj." in name:
            return [pre + name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")]
        return [pre + name]
    if name == "lm_head.weight":
        return ["model.embed_tokens.weight"] if cfg.tie_word_embeddings else ["lm_head.weight"]
    return [pre + name]  # embed_tokens.weight, norm.weight

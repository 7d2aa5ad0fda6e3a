"""Llama-family decoders, described: Llama 2/3/3.1+, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm per head).

The modules (models/llama.py) fuse the projections (qkv_proj, gate_up_proj); `param_sources` says which
checkpoint tensors fill them. The helpers below (`attention_tensors`, `decoder_tensors`, `fused_sources`,
`unpermute_qk`) serve the other architectures' descriptions too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spillover.config import ModelConfig
from spillover.models.arch.base import Architecture


class Llama(Architecture):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    gguf_archs = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
    gguf_skip = ("rope_freqs.weight",)  # llama3 rope factors: recomputed from metadata

    @classmethod
    def gguf_model_type(cls, md: Mapping[str, Any], arch: str) -> str:
        """llama.cpp writes Mixtral as "llama" with `llama.expert_count` (models/arch/mixtral.py)."""
        return "mixtral" if arch == "llama" and md.get("llama.expert_count") else cls.gguf_archs[arch]

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h, i = cfg.hidden_size, cfg.intermediate_size
        layer = attention_tensors(cfg, cfg.qk_norm) | {
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        return decoder_tensors(cfg, layer)

    @classmethod
    def from_gguf(cls, name: str, w: Any, cfg: ModelConfig) -> Any:
        if cfg.model_type in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            return unpermute_qk(w, heads)
        return w

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        return fused_sources(name) or super().param_sources(name, cfg)


def attention_tensors(cfg: ModelConfig, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """One layer's attention tensors as HF checkpoints name them (relative to the layer): q/k/v/o, the q/k/v
    biases when `cfg.attention_bias`, the per-head q/k norms when `qk_norm`."""
    h, hd = cfg.hidden_size, cfg.head_dim
    qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out = {
        "self_attn.q_proj.weight": (qd, h),
        "self_attn.k_proj.weight": (kvd, h),
        "self_attn.v_proj.weight": (kvd, h),
        "self_attn.o_proj.weight": (h, qd),
    }
    if cfg.attention_bias:
        out |= {
            "self_attn.q_proj.bias": (qd,),
            "self_attn.k_proj.bias": (kvd,),
            "self_attn.v_proj.bias": (kvd,),
        }
    if qk_norm:
        out |= {"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}
    return out


def decoder_tensors(cfg: ModelConfig, layer: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Embeddings, `layer`'s tensors in every decoder layer, the final norm and (untied) lm_head."""
    h = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        out |= {f"model.layers.{n}.{k}": s for k, s in layer.items()}
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""The fused projections and the checkpoint projections stacked into each (in that order)."""


def fused_sources(name: str) -> list[str] | None:
    """Checkpoint tensors of the fused projections (qkv_proj, gate_up_proj); None for other parameters."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return ["model." + name.replace(fused, p) for p in parts]
    return None


def unpermute_qk(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> Hugging Face's rotate-half layout), of a
    torch tensor or a numpy array (rows of blocks: numpy copies on one thread, where torch's parallel copy of
    these small tensors stalls whenever the OS takes a core away: 0.4 s of a load on a busy machine)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ARCH = Llama

"""Mixtral (8x7B, 8x22B), described: Mistral attention, a sparse MLP of `num_local_experts` SwiGLU experts
with top-2 routing (the chosen experts' softmax weights renormalized), every layer sparse.

Same modules and expert stages as Qwen3-MoE (models/qwen3_moe.py, layers/moe.py); only the checkpoint names
differ: `block_sparse_moe.gate` is the router, `block_sparse_moe.experts.<e>.w1/w3/w2` are gate/up/down.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spillover.config import ModelConfig
from spillover.models.arch.base import GGUF_LAYER_NAMES, KVSpec, LayerSpec
from spillover.models.arch.llama import attention_tensors, decoder_tensors, fused_sources, unpermute_qk
from spillover.models.arch.qwen3_moe import MoE


class Mixtral(MoE):
    model_types = ("mixtral",)
    gguf_archs = {"mixtral": "mixtral"}  # llama.cpp writes "llama" + expert_count (Llama says so)
    gguf_layer_names = {  # stacked over the experts: [E, out, in]
        **GGUF_LAYER_NAMES,
        "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
        "ffn_gate_exps.weight": "block_sparse_moe.experts.w1.weight",
        "ffn_up_exps.weight": "block_sparse_moe.experts.w3.weight",
        "ffn_down_exps.weight": "block_sparse_moe.experts.w2.weight",
    }
    expert_suffixes = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")

    @classmethod
    def gguf_config(cls, md: Mapping[str, Any], arch: str) -> dict[str, Any]:
        return {
            "model_type": "mixtral",
            "num_local_experts": int(md[f"{arch}.expert_count"]),
            "num_experts_per_tok": int(md[f"{arch}.expert_used_count"]),
            "stacked_experts": True,
        }

    @classmethod
    def from_gguf(cls, name: str, w: Any, cfg: ModelConfig) -> Any:
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp permutes llama-arch q/k rows
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            return unpermute_qk(w, heads)
        return w

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        base = ModelConfig.from_hf(dict(raw))
        extra = {
            "num_experts": int(raw["num_local_experts"]),
            "num_experts_per_tok": int(raw["num_experts_per_tok"]),
            "moe_intermediate_size": base.intermediate_size,
            "norm_topk_prob": True,
            "sliding_window": raw.get("sliding_window"),
            "stacked_experts": bool(raw.get("stacked_experts", False)),  # GGUF: [E, out, in] tensors
        }
        return base.replace(extra=extra)

    @classmethod
    def layer_specs(cls, cfg: ModelConfig) -> list[LayerSpec]:
        kv = KVSpec(cfg.num_key_value_heads, cfg.head_dim, cfg.extra.get("sliding_window"))
        return [LayerSpec(kv)] * cfg.num_hidden_layers

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h, i, E = cfg.hidden_size, cfg.intermediate_size, cfg.extra["num_experts"]
        layer = attention_tensors(cfg, qk_norm=False) | {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "block_sparse_moe.gate.weight": (E, h),
        }
        for e in range(E):
            ex = f"block_sparse_moe.experts.{e}"
            layer |= {f"{ex}.w1.weight": (i, h), f"{ex}.w3.weight": (i, h), f"{ex}.w2.weight": (h, i)}
        return decoder_tensors(cfg, layer)

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        """Router and stacked experts from per-expert tensors: gate_up_proj <- w1_0, w3_0, w1_1, w3_1, ...
        (concatenated along dim 0, viewed as [E, 2I, H]); down_proj <- w2_0, w2_1, ..."""
        base = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            base, _, what = base.rpartition(".")
            parts = ("w1", "w3") if what == "gate_up_proj" else ("w2",)
            if cfg.extra.get("stacked_experts"):  # GGUF: one [E, out, in] tensor each (from_checkpoint)
                return [f"model.{base}.{p}.weight" for p in parts]
            return [f"model.{base}.{e}.{p}.weight" for e in range(cfg.extra["num_experts"]) for p in parts]
        if ".mlp.gate." in name:
            return ["model." + base]
        return fused_sources(name) or super().param_sources(name, cfg)


ARCH = Mixtral

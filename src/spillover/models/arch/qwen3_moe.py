"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B), described: Qwen3 attention (q/k RMSNorm per head), a sparse MLP of
`num_experts` SwiGLU experts with top-k routing (weights renormalized when `norm_topk_prob`), no shared
expert. Layers listed in `mlp_only_layers` (or off the `decoder_sparse_step`) have a dense MLP.

The experts of a layer are one stage of their own, `layers.<i>.experts` (layers/moe.py): the planner can keep
attention, router and norms of every layer on the GPU and the experts in CPU memory. Checkpoints hold one
tensor per expert (`mlp.experts.<e>.gate_proj.weight`); they fill the stacked `experts.gate_up_proj`
[E, 2I, H] / `experts.down_proj` [E, H, I] (`param_sources`). `MoE` is what Qwen3-MoE and Mixtral share.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from spillover.config import ModelConfig
from spillover.models.arch.base import GGUF_LAYER_NAMES, Architecture, layer_stage
from spillover.models.arch.llama import attention_tensors, decoder_tensors, fused_sources

_EXPERT = re.compile(r"^(?:model\.)?layers\.(\d+)\..*\.experts\.")


def sparse_layers(cfg: ModelConfig) -> list[bool]:
    """Per layer: True where the MLP is the sparse experts block."""
    x = cfg.extra
    step, dense = x.get("decoder_sparse_step", 1), set(x.get("mlp_only_layers", ()))
    return [
        i not in dense and x["num_experts"] > 0 and (i + 1) % step == 0 for i in range(cfg.num_hidden_layers)
    ]


def expert_stage(i: int) -> str:
    return f"{layer_stage(i)}.experts"


class MoE(Architecture):
    """What Qwen3-MoE and Mixtral share: expert stages, stacked experts from per-expert checkpoints."""

    expert_suffixes: tuple[str, ...] = ("_proj.weight",)

    @classmethod
    def from_checkpoint(cls, name: str, w: Any) -> Any:
        """GGUF's stacked gate and up ([E, I, H] each, concatenated: [2E, I, H]) -> per expert gate then up
        rows, [E, 2I, H]."""
        if name.endswith("experts.gate_up_proj") and w.dim() == 3:
            two_e, i, h = w.shape
            return w.view(2, two_e // 2, i, h).transpose(0, 1).reshape(two_e // 2, 2 * i, h)
        return w

    @classmethod
    def stage_of(cls, name: str) -> str:
        m = _EXPERT.match(name)
        return expert_stage(int(m.group(1))) if m else super().stage_of(name)

    @classmethod
    def is_isq_target(cls, name: str, shape: tuple[int, ...]) -> bool:
        """The attention and dense projections, and every expert matrix (2-D per-expert checkpoint tensors,
        or GGUF's 3-D stacks: ISQ'd per expert); not the router."""
        dims = len(shape) == 2 or (len(shape) == 3 and ".experts." in name)
        return cls.layer_of(name) is not None and dims and name.endswith(cls.expert_suffixes)


class Qwen3Moe(MoE):
    model_types = ("qwen3_moe",)
    gguf_archs = {"qwen3moe": "qwen3_moe"}
    gguf_layer_names = {  # GGUF stacks each expert matrix over the experts: [E, out, in]
        **GGUF_LAYER_NAMES,
        "ffn_gate_inp.weight": "mlp.gate.weight",
        "ffn_gate_exps.weight": "mlp.experts.gate_proj.weight",
        "ffn_up_exps.weight": "mlp.experts.up_proj.weight",
        "ffn_down_exps.weight": "mlp.experts.down_proj.weight",
    }

    @classmethod
    def gguf_config(cls, md: Mapping[str, Any], arch: str) -> dict[str, Any]:
        return {
            "num_experts": int(md[f"{arch}.expert_count"]),
            "num_experts_per_tok": int(md[f"{arch}.expert_used_count"]),
            "moe_intermediate_size": int(md[f"{arch}.expert_feed_forward_length"]),
            "norm_topk_prob": True,  # llama.cpp's qwen3moe graph renormalizes the chosen weights
            "stacked_experts": True,
        }

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        base = ModelConfig.from_hf(dict(raw))
        extra = {
            "num_experts": int(raw.get("num_experts", raw.get("num_local_experts", 0))),
            "num_experts_per_tok": int(raw["num_experts_per_tok"]),
            "moe_intermediate_size": int(raw["moe_intermediate_size"]),
            "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
            "decoder_sparse_step": int(raw.get("decoder_sparse_step", 1)),
            "mlp_only_layers": tuple(raw.get("mlp_only_layers") or ()),
            "stacked_experts": bool(raw.get("stacked_experts", False)),  # GGUF: [E, out, in] tensors
        }
        return base.replace(qk_norm=True, extra=extra)

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h, i = cfg.hidden_size, cfg.intermediate_size
        E, mi = cfg.extra["num_experts"], cfg.extra["moe_intermediate_size"]
        common = attention_tensors(cfg, qk_norm=True) | {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
        sparse = {"mlp.gate.weight": (E, h)}
        for e in range(E):
            sparse |= {
                f"mlp.experts.{e}.gate_proj.weight": (mi, h),
                f"mlp.experts.{e}.up_proj.weight": (mi, h),
                f"mlp.experts.{e}.down_proj.weight": (h, mi),
            }
        dense = {"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
        out = decoder_tensors(cfg, {})
        for n, s in enumerate(sparse_layers(cfg)):
            out |= {f"model.layers.{n}.{k}": v for k, v in (common | (sparse if s else dense)).items()}
        return out

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        """Stacked experts from per-expert tensors: gate_up_proj <- gate_0, up_0, gate_1, up_1, ... (each
        [I, H]; concatenated along dim 0 and viewed as [E, 2I, H]); down_proj <- down_0, down_1, ..."""
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            base, _, what = name.rpartition(".")
            parts = ("gate_proj", "up_proj") if what == "gate_up_proj" else ("down_proj",)
            if cfg.extra.get("stacked_experts"):  # GGUF: one [E, out, in] tensor each (from_checkpoint)
                return [f"model.{base}.{p}.weight" for p in parts]
            E = cfg.extra["num_experts"]
            return [f"model.{base}.{e}.{p}.weight" for e in range(E) for p in parts]
        return fused_sources(name) or super().param_sources(name, cfg)


ARCH = Qwen3Moe

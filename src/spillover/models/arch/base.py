"""The model contract, its torch-free half: what an architecture says from its config alone (nothing loaded),
for the estimate, the planner, the file readers, the loader and the KV allocation.

An architecture is one `Architecture` subclass in `models/arch/<name>.py` (its `ARCH`); its nn.Module class in
`models/<name>.py` (`MODEL`) inherits it and adds the modules (models/base.py: `CausalLM`). The class methods:

- `config_from_hf(raw)`: config.json (or GGUF metadata turned into config.json terms by `gguf_config`) ->
  ModelConfig, architecture-specific fields in `ModelConfig.extra`;
- `checkpoint_tensors(cfg)`: every checkpoint tensor (Hugging Face names) and its shape, for the estimate;
- `gguf_archs` / `gguf_name` / `from_gguf(name, w, cfg)`: llama.cpp tensor names and value conventions -> Hugging
  Face;
- `param_sources(name, cfg)` / `from_checkpoint(name, w)`: which checkpoint tensors fill a parameter;
- `layer_specs(cfg)`: per decoder layer, its KV cache (heads, head dim, sliding window or none) and rope table;
- `stage_of(name)`: the placeable part a parameter or checkpoint tensor belongs to (`STAGE_EMBED`,
  `layer_stage(i)`, `STAGE_HEAD`; a layer's experts, a vision tower);
- `is_isq_target(name, shape)`: the checkpoint tensors that in-situ quantization replaces (the weights of the
  nn.Linear modules inside decoder layers).

`from_gguf` and `from_checkpoint` take tensors (torch or numpy) and use only their methods: this module and
every `models/arch/<name>.py` import no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from spillover.config import ModelConfig

STAGE_EMBED = "embed"
STAGE_HEAD = "head"
STAGE_VISION = "vision"  # a vision model's tower and projector (placed on a GPU first)
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def layer_stage(i: int) -> str:
    return f"layers.{i}"


def stage_names(num_layers: int) -> list[str]:
    """Every stage of a decoder-only model in forward order."""
    return [STAGE_EMBED, *(layer_stage(i) for i in range(num_layers)), STAGE_HEAD]


@dataclass(frozen=True)
class KVSpec:
    """The KV cache of one decoder layer. `sliding_window`: the layer attends to its last that many tokens
    (the cache keeps only those); None: to every token."""

    kv_heads: int
    head_dim: int
    sliding_window: int | None = None

    def bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class LayerSpec:
    """What the engine must provide one decoder layer: its KV cache and its rotary table (a key of
    `Architecture.rope_configs`)."""

    kv: KVSpec
    rope: str = "default"


# llama.cpp tensor names -> Hugging Face names shared by most decoders; "{i}" blocks are per layer
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class Architecture:
    """Base of every architecture's description; the class methods have defaults that fit Llama-style
    checkpoints. Only class attributes and class methods: it is never instantiated on its own."""

    model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values this class serves
    gguf_archs: ClassVar[Mapping[str, str]] = {}  # GGUF general.architecture -> model_type
    gguf_layer_names: ClassVar[Mapping[str, str]] = GGUF_LAYER_NAMES
    gguf_skip: ClassVar[tuple[str, ...]] = ()  # GGUF tensors the model recomputes (e.g. rope factors)
    gguf_projectors: ClassVar[Mapping[str, str]] = {}  # mmproj projector type -> the text GGUF arch it fits
    chat_template: ClassVar[str | None] = None  # used when the checkpoint ships none

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        return ModelConfig.from_hf(dict(raw))

    @classmethod
    def gguf_config(cls, md: Mapping[str, Any], arch: str) -> dict[str, Any]:
        """Architecture-specific config.json fields from GGUF metadata (the common ones are read already)."""
        return {}

    @classmethod
    def gguf_model_type(cls, md: Mapping[str, Any], arch: str) -> str:
        """The model_type of a GGUF of general.architecture `arch` this class lists in `gguf_archs`."""
        return cls.gguf_archs[arch]

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def layer_specs(cls, cfg: ModelConfig) -> list[LayerSpec]:
        kv = KVSpec(cfg.num_key_value_heads, cfg.head_dim)
        return [LayerSpec(kv)] * cfg.num_hidden_layers

    @classmethod
    def rope_configs(cls, cfg: ModelConfig) -> dict[str, ModelConfig]:
        """The rotary tables the layers use, by the key LayerSpec.rope names (a config with the rope fields)."""
        return {"default": cfg}

    @classmethod
    def gguf_name(cls, name: str) -> str | None:
        """A llama.cpp tensor name -> its Hugging Face name; None for tensors the model does not use."""
        if name in GGUF_GLOBAL_NAMES:
            return GGUF_GLOBAL_NAMES[name]
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest in cls.gguf_layer_names:
                return f"model.layers.{int(i)}.{cls.gguf_layer_names[rest]}"
        return None

    @classmethod
    def from_gguf(cls, name: str, w: Any, cfg: ModelConfig) -> Any:
        """A dequantized GGUF tensor (Hugging Face name) -> the value Hugging Face checkpoints hold."""
        return w

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        """Checkpoint tensors (HF names) that make up parameter `name`, concatenated along dim 0."""
        if name == "lm_head.weight":
            return ["model.embed_tokens.weight"] if cfg.tie_word_embeddings else ["lm_head.weight"]
        return ["model." + name]

    @classmethod
    def from_checkpoint(cls, name: str, w: Any) -> Any:
        """A loaded parameter (after concatenation, in f32 or the model dtype) -> what the module computes with."""
        return w

    @classmethod
    def stage_of(cls, name: str) -> str:
        """The stage a parameter (or an HF checkpoint tensor) belongs to."""
        m = _LAYER.match(name)
        if m:
            return layer_stage(int(m.group(1)))
        if name.endswith("embed_tokens.weight") and not name.startswith("lm_head"):
            return STAGE_EMBED
        return STAGE_HEAD

    @classmethod
    def layer_of(cls, name: str) -> int | None:
        """The decoder layer an HF checkpoint tensor belongs to, or None."""
        m = _LAYER.match(name)
        return int(m.group(1)) if m else None

    @classmethod
    def is_isq_target(cls, name: str, shape: tuple[int, ...]) -> bool:
        """ISQ replaces the nn.Linear projections inside decoder layers: 2-D `*_proj.weight` tensors."""
        return cls.layer_of(name) is not None and name.endswith("_proj.weight") and len(shape) == 2

"""Gemma 3 (text), described: sliding-window and global layers, q/k norms, four norms per layer, GELU-tanh,
scaled and tied embeddings (the modules: models/gemma3.py).

- Layers follow `layer_types` (default: five sliding-window layers, then one global, repeating). Sliding
  layers attend to their last `sliding_window` tokens with rope base `rope_local_base_freq` (10k); global
  layers to every token with `rope_theta` (1M) and its scaling. The KV cache of a sliding layer holds only
  the window (models/arch/base.py: LayerSpec).
- Gemma's RMSNorm multiplies by (1 + w); the loader stores 1 + w (`from_checkpoint`), so the plain RMSNorm
  (and its fused CUDA kernel) computes it. llama.cpp's GGUF already stores 1 + w (`from_gguf` undoes it so
  sources hold Hugging Face values).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spillover.config import ModelConfig
from spillover.models.arch.base import GGUF_LAYER_NAMES, Architecture, KVSpec, LayerSpec
from spillover.models.arch.llama import attention_tensors, decoder_tensors, fused_sources

SLIDING, FULL = "sliding_attention", "full_attention"

CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
"""Gemma 3's chat template (google/gemma-3-*-it), for checkpoints that ship none (GGUF files often do not)."""


class Gemma3(Architecture):
    model_types = ("gemma3_text", "gemma3")
    gguf_archs = {"gemma3": "gemma3_text"}
    gguf_layer_names = {
        **GGUF_LAYER_NAMES,
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    }
    chat_template = CHAT_TEMPLATE

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        text = dict(raw.get("text_config") or raw) if "hidden_size" not in raw else dict(raw)
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        text.setdefault("architectures", raw.get("architectures", []))
        text.setdefault("model_type", "gemma3_text")
        rp = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), dict) else {}
        full = dict(rp.get(FULL) or {})
        local = dict(rp.get(SLIDING) or {})
        theta = float(full.get("rope_theta", text.get("rope_theta", 1_000_000.0)))
        scaling = text.get("rope_scaling")
        if full.get("rope_type", "default") != "default":
            scaling = full
        n = int(text["num_hidden_layers"])
        pattern = int(text.get("sliding_window_pattern") or 6)
        types = text.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        plain = {k: v for k, v in text.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        base = ModelConfig.from_hf({**plain, "rope_theta": theta, "rope_scaling": scaling})
        if text.get("attn_logit_softcapping"):
            from spillover.errors import UnsupportedModelError

            raise UnsupportedModelError("Gemma attention logit soft-capping (Gemma 2) is not supported")
        extra = {
            "layer_types": tuple(types),
            "sliding_window": int(text.get("sliding_window") or 4096),
            "rope_local_base_freq": float(
                local.get("rope_theta", text.get("rope_local_base_freq", 10_000.0))
            ),
            "query_pre_attn_scalar": float(text.get("query_pre_attn_scalar", 256)),
            "final_logit_softcapping": text.get("final_logit_softcapping"),
        }
        return base.replace(model_type="gemma3_text", extra=extra)

    @classmethod
    def gguf_config(cls, md: Mapping[str, Any], arch: str) -> dict[str, Any]:
        extra: dict[str, Any] = {"model_type": "gemma3_text"}
        if f"{arch}.attention.sliding_window" in md:
            extra["sliding_window"] = int(md[f"{arch}.attention.sliding_window"])
        tokens = md.get("tokenizer.ggml.tokens") or []
        eos = md.get("tokenizer.ggml.eos_token_id")
        if len(tokens) > 106 and tokens[106] == "<end_of_turn>" and eos is not None:
            extra["eos_token_id"] = [int(eos), 106]  # the instruction-tuned models end turns with it
        return extra

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h, i = cfg.hidden_size, cfg.intermediate_size
        layer = attention_tensors(cfg, qk_norm=True) | {
            "mlp.gate_proj.weight": (i, h),
            "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "pre_feedforward_layernorm.weight": (h,),
            "post_feedforward_layernorm.weight": (h,),
        }
        return decoder_tensors(cfg, layer)

    @classmethod
    def layer_specs(cls, cfg: ModelConfig) -> list[LayerSpec]:
        window = cfg.extra["sliding_window"]
        full = LayerSpec(KVSpec(cfg.num_key_value_heads, cfg.head_dim), "global")
        sliding = LayerSpec(KVSpec(cfg.num_key_value_heads, cfg.head_dim, window), "local")
        return [sliding if t == SLIDING else full for t in cfg.extra["layer_types"]]

    @classmethod
    def rope_configs(cls, cfg: ModelConfig) -> dict[str, ModelConfig]:
        local = cfg.replace(rope_theta=cfg.extra["rope_local_base_freq"], rope_scaling=None)
        return {"global": cfg, "local": local}

    @classmethod
    def from_gguf(cls, name: str, w: Any, cfg: ModelConfig) -> Any:
        return w - 1 if name.endswith("norm.weight") else w  # llama.cpp stores 1 + w

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        return fused_sources(name) or super().param_sources(name, cfg)

    @classmethod
    def from_checkpoint(cls, name: str, w: Any) -> Any:
        return (w.float() + 1).to(w.dtype) if name.endswith("norm.weight") else w  # (1 + w) RMSNorm


ARCH = Gemma3

"""Llama 3.2 Vision (mllama), described: a Llama decoder with gated cross-attention layers whose K/V come from
the image, fed by a tiled ViT (the modules, the image processor and the cross-attention rows are in
models/mllama.py).

- Each image is one `<|image|>` token. Layers in `cross_attention_layers` attend from the text to the vision
  states of the images visible at each token (`cross_ranges`). These layers keep no KV cache of the text
  (`KVSpec(0, ...)`); their K/V of the image are computed once per sequence and layer, which the plan
  reserves (`cross_kv_bytes`).
- The tower + projector (`vision_model.*`, `multi_modal_projector.*`) are the stage `vision`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spillover.config import ModelConfig
from spillover.models.arch.base import STAGE_VISION, KVSpec, LayerSpec
from spillover.models.arch.llama import Llama, decoder_tensors

VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    return [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


class Mllama(Llama):
    model_types = ("mllama", "mllama_text_model")
    gguf_archs = {}
    takes_images = True
    cross_attention = True  # the runner gives cross layers their rows (LayerInput.cross), no decode graphs

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        text = {**dict(raw.get("text_config") or {}), "architectures": raw.get("architectures", [])}
        text["model_type"] = "llama"
        base = ModelConfig.from_hf(text).replace(model_type="mllama")
        if "tie_word_embeddings" in raw:
            base = base.replace(tie_word_embeddings=bool(raw["tie_word_embeddings"]))
        v = dict(raw.get("vision_config") or {})
        ratios = v.get("supported_aspect_ratios") or aspect_ratios(int(v.get("max_num_tiles", 4)))
        inter = list(v.get("intermediate_layers_indices", [3, 7, 15, 23, 30]))
        d = int(v.get("hidden_size", 1280))
        vision = {
            "hidden_size": d,
            "attention_heads": int(v.get("attention_heads", 16)),
            "num_hidden_layers": int(v.get("num_hidden_layers", 32)),
            "num_global_layers": int(v.get("num_global_layers", 8)),
            "intermediate_size": int(v.get("intermediate_size", 5120)),
            "image_size": int(v.get("image_size", 560)),
            "patch_size": int(v.get("patch_size", 14)),
            "max_num_tiles": int(v.get("max_num_tiles", 4)),
            "max_aspect_ratio_id": len(ratios),
            "intermediate_layers_indices": inter,
            "vision_output_dim": int(v.get("vision_output_dim", d * (len(inter) + 1))),
            "norm_eps": float(v.get("norm_eps", 1e-5)),
            "num_channels": int(v.get("num_channels", 3)),
        }
        extra = {
            "vision": vision,
            "cross_attention_layers": tuple((raw.get("text_config") or {}).get("cross_attention_layers", ())),
            "image_token_id": int(raw.get("image_token_index", raw.get("image_token_id", 128256))),
        }
        return base.replace(extra=extra)

    @classmethod
    def layer_specs(cls, cfg: ModelConfig) -> list[LayerSpec]:
        cross = set(cfg.extra["cross_attention_layers"])
        return [
            LayerSpec(KVSpec(0 if i in cross else cfg.num_key_value_heads, cfg.head_dim))
            for i in range(cfg.num_hidden_layers)
        ]

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        qd, kvd = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        mlp = {"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
               "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}  # fmt: skip
        self_attn = {"self_attn.q_proj.weight": (qd, h), "self_attn.k_proj.weight": (kvd, h),
                     "self_attn.v_proj.weight": (kvd, h), "self_attn.o_proj.weight": (h, qd)}  # fmt: skip
        cross = {"cross_attn.q_proj.weight": (qd, h), "cross_attn.k_proj.weight": (kvd, h),
                 "cross_attn.v_proj.weight": (kvd, h), "cross_attn.o_proj.weight": (h, qd),
                 "cross_attn.q_norm.weight": (hd,), "cross_attn.k_norm.weight": (hd,),
                 "cross_attn_attn_gate": (1,), "cross_attn_mlp_gate": (1,)}  # fmt: skip
        out = decoder_tensors(cfg, mlp | self_attn)
        out["model.embed_tokens.weight"] = (cfg.vocab_size + 8, h)
        for n in cfg.extra["cross_attention_layers"]:
            for k in self_attn:
                del out[f"model.layers.{n}.{k}"]
            out |= {f"model.layers.{n}.{k}": s for k, s in cross.items()}
        v = cfg.extra["vision"]
        d, vi, T, P = v["hidden_size"], v["intermediate_size"], v["max_num_tiles"], v["patch_size"]
        np_ = (v["image_size"] // P) ** 2 + 1
        ar = v["max_aspect_ratio_id"] + 1
        vm = {
            "patch_embedding.weight": (d, v["num_channels"], P, P), "class_embedding": (d,),
            "gated_positional_embedding.embedding": (np_, d), "gated_positional_embedding.gate": (1,),
            "gated_positional_embedding.tile_embedding.weight": (ar, T * np_ * d),
            "pre_tile_positional_embedding.embedding.weight": (ar, T * d), "pre_tile_positional_embedding.gate": (1,),
            "post_tile_positional_embedding.embedding.weight": (ar, T * d), "post_tile_positional_embedding.gate": (1,),
            "layernorm_pre.weight": (d,), "layernorm_pre.bias": (d,),
            "layernorm_post.weight": (d,), "layernorm_post.bias": (d,),
        }  # fmt: skip
        layer = {
            "input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
            "post_attention_layernorm.weight": (d,), "post_attention_layernorm.bias": (d,),
            "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d),
            "self_attn.v_proj.weight": (d, d), "self_attn.o_proj.weight": (d, d),
            "mlp.fc1.weight": (vi, d), "mlp.fc1.bias": (vi,), "mlp.fc2.weight": (d, vi), "mlp.fc2.bias": (d,),
        }  # fmt: skip
        for stack, n, gated in (("transformer", v["num_hidden_layers"], False),
                                ("global_transformer", v["num_global_layers"], True)):  # fmt: skip
            for j in range(n):
                vm |= {f"{stack}.layers.{j}.{k}": s for k, s in layer.items()}
                if gated:
                    vm |= {f"{stack}.layers.{j}.gate_attn": (1,), f"{stack}.layers.{j}.gate_ffn": (1,)}
        out |= {f"vision_model.{k}": s for k, s in vm.items()}
        out |= {
            "multi_modal_projector.weight": (h, v["vision_output_dim"]),
            "multi_modal_projector.bias": (h,),
        }
        return out

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        return [name] if name.startswith(VISION_PREFIXES) else super().param_sources(name, cfg)

    @classmethod
    def stage_of(cls, name: str) -> str:
        return STAGE_VISION if name.startswith(VISION_PREFIXES) else super().stage_of(name)

    # ---------------------------------------------------------------- images (multimodal.py) and the plan

    @classmethod
    def image_token_id(cls, cfg: ModelConfig) -> int:
        return cfg.extra["image_token_id"]

    @classmethod
    def cross_ranges(cls, cfg: ModelConfig, ids: list[int]) -> list[tuple[int, int]]:
        """Per image, the tokens that see it (transformers' get_cross_attention_token_mask; end: a large
        number for "to the end, generated tokens included")."""
        locs = [i for i, t in enumerate(ids) if t == cls.image_token_id(cfg)]
        end = 1 << 62
        if len(locs) == 1:
            return [(locs[0], end)]
        ranges = (
            [[a, b] for a, b in zip(locs[:-1], locs[1:], strict=True)] + [[locs[-1], end]] if locs else []
        )
        last = ranges[-1][1] if ranges else end
        for r in ranges[::-1]:
            if r[0] == r[1] - 1:
                r[1] = last
            last = r[1]
        return [tuple(r) for r in ranges]

    @classmethod
    def image_tokens(cls, cfg: ModelConfig, edge: int) -> int:
        return 1  # the <|image|> token; the image itself is cross-attention K/V (`cross_kv_bytes`)

    @classmethod
    def cross_kv_bytes(cls, cfg: ModelConfig, dtype_bytes: int, images: int) -> int:
        """One cross-attention layer's K/V of `images` images for one sequence."""
        v = cfg.extra["vision"]
        tokens = images * v["max_num_tiles"] * ((v["image_size"] // v["patch_size"]) ** 2 + 1)
        return 2 * tokens * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes

    @classmethod
    def vision_activation_bytes(cls, cfg: ModelConfig, dtype_bytes: int, images: int, edge: int) -> int:
        """Encoding `images` images (all tiles): per token the states, the kept intermediate layers, q/k/v,
        attention output and the MLP; the [L, L] bool mask; the projected states."""
        v = cfg.extra["vision"]
        P = (v["image_size"] // v["patch_size"]) ** 2 + 1
        L = v["max_num_tiles"] * (P + (8 - P % 8) % 8)
        d, i, n_int = v["hidden_size"], v["intermediate_size"], len(v["intermediate_layers_indices"])
        per_token = dtype_bytes * ((2 + n_int + 5) * d + 2 * i + cfg.hidden_size)
        return images * (L * per_token + L * L)


ARCH = Mllama

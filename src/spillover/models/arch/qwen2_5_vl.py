"""Qwen2.5-VL, described: a Qwen2 decoder with multimodal rope, fed by a native-resolution ViT (windowed
attention, 2-D rope, a 2x2 patch merger); the modules, the image processor and the rope positions are in
models/qwen2_5_vl.py.

- Each image is one `<|image_pad|>` in the prompt, expanded to its token count (`expand_prompt`); the runner
  puts the tower's output at those positions (engine/runner.py).
- Multimodal rope: the rotary frequencies are split into `mrope_section` parts (`rope_scaling`), each rotated
  by one of a token's (temporal, height, width) positions.
- The tower and merger are the stage `vision` (placed on a GPU first by the planner); ISQ and offload apply
  to the text layers only.
- GGUF (llama.cpp's layout): the text model is a `qwen2vl` GGUF (plain Qwen2 tensors, `rope.dimension_sections`),
  the tower a separate mmproj GGUF (`clip` architecture, projector type `qwen2.5vl_merger`): `v.blk.N.*` blocks
  with q/k/v split, the Conv3d patch kernel split into two Conv2d kernels (`v.patch_embd.weight` and `.weight.1`,
  one per frame), the merger as `v.post_ln` + `mm.0` / `mm.2`; full-attention blocks as a period
  (`clip.vision.n_wa_pattern`), the window fixed at 112 px. loading/source.py pairs the files; the class maps names
  (`gguf_name`) and rebuilds the fused tensors (`param_sources`, `from_checkpoint`). Without an mmproj a
  `qwen2vl` GGUF is the text-only Qwen2 it holds (`gguf_model_type`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from spillover.config import ModelConfig
from spillover.models.arch.base import STAGE_VISION
from spillover.models.arch.llama import Llama

PLAN_MAX_PIXELS = 12845056
"""The pixel range the plan assumes (the released Qwen2.5-VL checkpoints' preprocessor_config.json): a
1024 px image is 1036 x 1036 = 1369 tokens. Without that file the processor uses transformers' default,
28 * 28 * 1280, which never gives more tokens, so the plan is an upper bound."""
PLAN_MIN_PIXELS = 3136
"""The released checkpoints' min_pixels (56 x 56), what an mmproj that records no pixel range gets."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
GGUF_PROJECTOR = "qwen2.5vl_merger"
"""llama.cpp's projector type (`clip.projector_type`) of a Qwen2.5-VL mmproj."""
GGUF_WINDOW = 112
"""The attention window (pixels) llama.cpp's clip.cpp assumes for Qwen2.5-VL; mmproj files do not record it."""
GGUF_VISION_BLOCK = {
    "ln1.weight": "norm1.weight", "ln2.weight": "norm2.weight",
    "attn_q.weight": "attn.q.weight", "attn_q.bias": "attn.q.bias",
    "attn_k.weight": "attn.k.weight", "attn_k.bias": "attn.k.bias",
    "attn_v.weight": "attn.v.weight", "attn_v.bias": "attn.v.bias",
    "attn_out.weight": "attn.proj.weight", "attn_out.bias": "attn.proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}  # fmt: skip
"""An mmproj's `v.blk.N.<key>` -> `visual.blocks.N.<value>` (q/k/v stay split: `param_sources` fuses them)."""
GGUF_VISION_GLOBAL = {
    "v.patch_embd.weight": "visual.patch_embed.proj.frame0.weight",  # Conv3d kernel, frame 0: [D, C, P, P]
    "v.patch_embd.weight.1": "visual.patch_embed.proj.frame1.weight",  # frame 1
    "v.post_ln.weight": "visual.merger.ln_q.weight",
    "mm.0.weight": "visual.merger.mlp.0.weight", "mm.0.bias": "visual.merger.mlp.0.bias",
    "mm.2.weight": "visual.merger.mlp.2.weight", "mm.2.bias": "visual.merger.mlp.2.bias",
}  # fmt: skip
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL rule: both sides multiples of `factor`, pixels within [min, max], aspect kept."""
    if max(h, w) / min(h, w) > 200:
        from spillover.errors import ImageError

        raise ImageError(f"an image of {w} x {h} pixels is too narrow (aspect ratio over 200)")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def pixel_range(pre: Mapping[str, Any]) -> tuple[int, int]:
    """(min, max) pixels an image is resized into: a preprocessor config's, else transformers' defaults."""
    size = pre.get("size") or {}
    return (
        int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
    )


def patch_grid(v: Mapping[str, Any], h: int, w: int, pixels: tuple[int, int]) -> tuple[int, int]:
    """Patches high and wide of an h x w image resized (`smart_resize`) into `pixels` (min, max), for the vision
    config `v`."""
    p, m = v["patch_size"], v["spatial_merge_size"]
    rh, rw = smart_resize(h, w, p * m, *pixels)
    return rh // p, rw // p


class Qwen2_5_VL(Llama):
    model_types = ("qwen2_5_vl", "qwen2_5_vl_text")
    gguf_archs = {"qwen2vl": "qwen2_5_vl"}
    gguf_projectors = {GGUF_PROJECTOR: "qwen2vl"}  # an mmproj's projector type -> the text GGUF it pairs with
    takes_images = True

    @classmethod
    def config_from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        text = dict(raw.get("text_config") or {}) or {k: v for k, v in raw.items() if k != "vision_config"}
        text.setdefault("architectures", raw.get("architectures", []))
        rp = text.get("rope_parameters") or text.get("rope_scaling") or raw.get("rope_scaling") or {}
        section = list(rp.get("mrope_section") or [16, 24, 24])
        theta = float(rp.get("rope_theta", text.get("rope_theta", 1_000_000.0)))
        plain = {k: v for k, v in text.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        base = ModelConfig.from_hf({**plain, "model_type": "qwen2", "rope_theta": theta})
        if "tie_word_embeddings" in raw:
            base = base.replace(tie_word_embeddings=bool(raw["tie_word_embeddings"]))
        v = dict(raw.get("vision_config") or {})
        vision = {
            "depth": int(v.get("depth", 32)),
            "hidden_size": int(v.get("hidden_size", 1280)),
            "intermediate_size": int(v.get("intermediate_size", 3420)),
            "num_heads": int(v.get("num_heads", 16)),
            "in_channels": int(v.get("in_channels", v.get("in_chans", 3))),
            "out_hidden_size": int(v.get("out_hidden_size", base.hidden_size)),
            "patch_size": int(v.get("patch_size", 14)),
            "spatial_merge_size": int(v.get("spatial_merge_size", 2)),
            "temporal_patch_size": int(v.get("temporal_patch_size", 2)),
            "window_size": int(v.get("window_size", 112)),
            "fullatt_block_indexes": tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            "gguf": bool(
                v.get("gguf", False)
            ),  # llama.cpp's mmproj layout (q/k/v and the patch kernel split)
        }
        extra = {
            "vision": vision,
            "image_token_id": int(raw.get("image_token_id", text.get("image_token_id", 151655))),
        }
        if raw.get("preprocessor"):
            extra["preprocessor"] = dict(raw["preprocessor"])
        scaling = {"rope_type": "default", "mrope_section": section}
        return base.replace(model_type="qwen2_5_vl", attention_bias=True, rope_scaling=scaling, extra=extra)

    @classmethod
    def checkpoint_tensors(cls, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        out = super().checkpoint_tensors(cfg)
        v = cfg.extra["vision"]
        d, i, c, p, t = v["hidden_size"], v["intermediate_size"], v["in_channels"], v["patch_size"], v["temporal_patch_size"]  # fmt: skip
        m = d * v["spatial_merge_size"] ** 2
        out["visual.patch_embed.proj.weight"] = (d, c, t, p, p)
        block = {
            "norm1.weight": (d,), "norm2.weight": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "mlp.gate_proj.weight": (i, d), "mlp.gate_proj.bias": (i,),
            "mlp.up_proj.weight": (i, d), "mlp.up_proj.bias": (i,),
            "mlp.down_proj.weight": (d, i), "mlp.down_proj.bias": (d,),
        }  # fmt: skip
        for n in range(v["depth"]):
            out |= {f"visual.blocks.{n}.{k}": s for k, s in block.items()}
        out |= {
            "visual.merger.ln_q.weight": (d,),
            "visual.merger.mlp.0.weight": (m, m), "visual.merger.mlp.0.bias": (m,),
            "visual.merger.mlp.2.weight": (v["out_hidden_size"], m), "visual.merger.mlp.2.bias": (v["out_hidden_size"],),
        }  # fmt: skip
        return out

    @classmethod
    def param_sources(cls, name: str, cfg: ModelConfig) -> list[str]:
        if not name.startswith("visual."):
            return super().param_sources(name, cfg)
        if cfg.extra["vision"]["gguf"]:  # llama.cpp's split tensors, concatenated along dim 0 by the loader
            if ".attn.qkv." in name:
                return [name.replace(".qkv.", f".{p}.") for p in "qkv"]
            if name == "visual.patch_embed.proj.weight":
                return ["visual.patch_embed.proj.frame0.weight", "visual.patch_embed.proj.frame1.weight"]
        return [name]

    @classmethod
    def from_checkpoint(cls, name: str, w: Any) -> Any:
        if (
            name == "visual.patch_embed.proj.weight" and w.dim() == 4
        ):  # an mmproj's two frame kernels, stacked
            d = w.shape[0] // 2  # [2D, C, P, P] -> [D, C, 2, P, P]
            return w.view(2, d, *w.shape[1:]).permute(1, 2, 0, 3, 4).contiguous()
        return w

    # ---------------------------------------------------------------- GGUF: a qwen2vl text file + an mmproj

    @classmethod
    def gguf_model_type(cls, md: Mapping[str, Any], arch: str) -> str:
        """With its mmproj (loading/source.py merges the mmproj's `clip.*` keys into `md`): Qwen2.5-VL;
        without: the Qwen2 text model it holds (M-RoPE over text alone is plain rope)."""
        return "qwen2_5_vl" if md.get("clip.projector_type") == GGUF_PROJECTOR else "qwen2"

    @classmethod
    def gguf_config(cls, md: Mapping[str, Any], arch: str) -> dict[str, Any]:
        """The config.json fields a `qwen2vl` text GGUF and its mmproj's `clip.vision.*` keys hold."""

        def clip(key: str, default: Any = None) -> Any:
            return md.get(f"clip.vision.{key}", default)

        depth = int(clip("block_count"))
        period = int(clip("n_wa_pattern") or 0)  # llama.cpp: block i is full iff (i + 1) % n == 0; 0: all
        full = [i for i in range(depth) if not period or (i + 1) % period == 0]
        if clip("fullatt_block_indexes") is not None:  # the list itself (older and other converters)
            full = [int(i) for i in clip("fullatt_block_indexes")]
        sections = list(md.get(f"{arch}.rope.dimension_sections") or [16, 24, 24])[:3]
        tokens = md.get("tokenizer.ggml.tokens") or []
        image_token = tokens.index("<|image_pad|>") if "<|image_pad|>" in tokens else 151655
        vision = {
            "depth": depth,
            "hidden_size": int(clip("embedding_length")),
            "intermediate_size": int(clip("feed_forward_length")),
            "num_heads": int(clip("attention.head_count")),
            "out_hidden_size": int(clip("projection_dim")),
            "patch_size": int(clip("patch_size", 14)),
            "spatial_merge_size": int(clip("spatial_merge_size", 2)),
            "temporal_patch_size": 2,  # the two frame kernels
            "window_size": int(clip("window_size", GGUF_WINDOW)),
            "fullatt_block_indexes": full,
            "gguf": True,
        }
        pre = {
            "image_mean": list(clip("image_mean") or CLIP_MEAN),
            "image_std": list(clip("image_std") or CLIP_STD),
            "min_pixels": int(clip("image_min_pixels") or PLAN_MIN_PIXELS),
            "max_pixels": int(clip("image_max_pixels") or PLAN_MAX_PIXELS),
        }
        return {"rope_scaling": {"rope_type": "default", "mrope_section": sections}, "vision_config": vision,
                "image_token_id": image_token, "preprocessor": pre}  # fmt: skip

    @classmethod
    def gguf_name(cls, name: str) -> str | None:
        if name in GGUF_VISION_GLOBAL:
            return GGUF_VISION_GLOBAL[name]
        if name.startswith("v.blk."):
            _, _, i, rest = name.split(".", 3)
            return f"visual.blocks.{int(i)}.{GGUF_VISION_BLOCK[rest]}" if rest in GGUF_VISION_BLOCK else None
        return super().gguf_name(name)

    @classmethod
    def stage_of(cls, name: str) -> str:
        return STAGE_VISION if name.startswith("visual.") else super().stage_of(name)

    # ---------------------------------------------------------------- images and the plan (placement/estimate.py)

    @classmethod
    def image_token_id(cls, cfg: ModelConfig) -> int:
        return cfg.extra["image_token_id"]

    @classmethod
    def image_tokens(cls, cfg: ModelConfig, edge: int) -> int:
        """Placeholder tokens of a square image of `edge` pixels (`PLAN_MAX_PIXELS`)."""
        v = cfg.extra["vision"]
        gh, gw = patch_grid(v, edge, edge, pixel_range({"max_pixels": PLAN_MAX_PIXELS}))
        return gh * gw // v["spatial_merge_size"] ** 2

    @classmethod
    def vision_activation_bytes(cls, cfg: ModelConfig, dtype_bytes: int, images: int, edge: int) -> int:
        """Peak transients of encoding `images` images of `edge` pixels at once: per patch the block input and
        residual, qkv, rotated q/k (f32), attention output, the MLP's gate/up/act; plus the f32 pixels."""
        v = cfg.extra["vision"]
        gh, gw = patch_grid(v, edge, edge, pixel_range({"max_pixels": PLAN_MAX_PIXELS}))
        n = images * gh * gw
        d, i = v["hidden_size"], v["intermediate_size"]
        per_patch = dtype_bytes * (2 * d + 3 * d + d + 3 * i) + 4 * 4 * d
        pixels = n * v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * 4
        return n * per_patch + pixels


ARCH = Qwen2_5_VL

"""Qwen2.5-VL: a Qwen2 decoder with multimodal rope, fed by a native-resolution ViT (windowed attention, 2-D rope,
a 2x2 patch merger).

- Images (multimodal.py turns each into patches, `ImageProcessor` below equals transformers' processor):
  14 x 14 x 2-frame patches -> `patch_embed` (a Conv3d whose kernel is its stride: one matmul) -> `depth`
  blocks (RMSNorm, attention with 2-D rope over (row, column), SiLU MLP with biases). Blocks in
  `fullatt_block_indexes` attend over the whole image, the others inside windows of `window_size` pixels;
  tokens are reordered window by window first (`window_index`) and back after the merger, which turns each
  2 x 2 group of patches into one text-model token (`out_hidden_size`).
- Each image is one `<|image_pad|>` in the prompt, expanded to its token count (`expand_prompt`); the runner
  puts the tower's output at those positions (engine/runner.py).
- Multimodal rope: a token has (temporal, height, width) positions; text tokens have three equal ones. The
  rotary frequencies are split into `mrope_section` parts, each rotated by one of the three
  (layers/rotary.py). After an image, text positions continue from its largest position + 1, so a sequence's
  position p >= its prompt length is p + delta (`rope_positions`): decode is plain rope.
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spillover.config import ModelConfig
from spillover.layers.norm import RMSNorm
from spillover.models.base import STAGE_VISION
from spillover.models.llama import LlamaForCausalLM

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


# ------------------------------------------------------------------ the vision tower


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Bidirectional attention inside each segment cu[i]:cu[i+1] of q/k/v [N, heads, hd]; segments are padded
    to the longest and run as one batch (a key mask hides the padding)."""
    lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True) if b > a]
    starts = [a for a, b in zip(cu[:-1], cu[1:], strict=True) if b > a]
    L = max(lens)
    span = torch.arange(L, device=q.device)
    idx = torch.tensor(starts, device=q.device)[:, None] + span[None, :]  # [B, L]
    valid = span[None, :] < torch.tensor(lens, device=q.device)[:, None]  # [B, L]
    idx = torch.where(valid, idx, 0)

    def gather(t: torch.Tensor) -> torch.Tensor:  # [N, h, d] -> [B, h, L, d]
        return t[idx].transpose(1, 2)

    mask = None if min(lens) == L else valid[:, None, None, :]
    o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), attn_mask=mask)  # [B, h, L, d]
    return o.transpose(1, 2)[valid]  # [N, h, d]


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.heads, self.hd).unbind(1)  # [N, h, hd] each
        c, s = cos[:, None, :], sin[:, None, :]
        dt = q.dtype
        q = (q.float() * c + _rotate_half(q.float()) * s).to(dt)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(dt)
        return self.proj(varlen_attention(q, k, v, cu).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=True)
        self.up_proj = nn.Linear(dim, inter, bias=True)
        self.down_proj = nn.Linear(inter, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, inter: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6)
        self.attn = VisionAttention(dim, heads)
        self.norm2 = RMSNorm(dim, 1e-6)
        self.mlp = VisionMLP(dim, inter)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, v: Mapping[str, Any]) -> None:
        super().__init__()
        c, t, p = v["in_channels"], v["temporal_patch_size"], v["patch_size"]
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(v["hidden_size"], c, t, p, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C*T*P*P] -> [N, D]
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1))  # a Conv3d whose kernel equals its stride


class PatchMerger(nn.Module):
    def __init__(self, dim: int, out: int, merge: int) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N / merge^2, out]
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class VisionTower(nn.Module):
    def __init__(self, v: Mapping[str, Any]) -> None:
        super().__init__()
        self.v = dict(v)
        d, h = v["hidden_size"], v["num_heads"]
        self.merge = v["spatial_merge_size"]
        self.patch_embed = PatchEmbed(v)
        self.blocks = nn.ModuleList(VisionBlock(d, h, v["intermediate_size"]) for _ in range(v["depth"]))
        self.merger = PatchMerger(d, v["out_hidden_size"], self.merge)
        self.spatial = (d // h) // 2  # rope channels per axis

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels: [patches, C*T*P*P] of every image in order -> [patches / merge^2, out_hidden]."""
        dev = self.patch_embed.proj.weight.device
        unit = self.merge**2
        pos = vision_positions(grids, self.merge)  # [N, 2] (row, column)
        window, cu_window = window_index(grids, self.merge, self.v["window_size"], self.v["patch_size"])
        cu_full = [0]
        for t, h, w in grids:
            cu_full += [cu_full[-1] + h * w] * t
        x = self.patch_embed(pixels.to(dev))  # [N, D]
        N = x.shape[0]
        order = (
            (window[:, None] * unit + torch.arange(unit)[None, :]).flatten().to(dev)
        )  # window-major patches
        x = x[order]
        inv = 1.0 / (
            10000.0 ** (torch.arange(0, self.spatial, 2, dtype=torch.float, device=dev) / self.spatial)
        )
        freqs = pos.to(dev).float()[..., None] * inv[None, None, :]  # [N, 2, spatial/2]
        freqs = freqs.flatten(1)[order]  # [N, hd/2]: rows then columns
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)  # [N, hd]
        full = set(self.v["fullatt_block_indexes"])
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu_full if i in full else cu_window)
        out = self.merger(x)  # [N / unit, out] in window order
        return out[torch.argsort(window.to(dev))] if N else out


def vision_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch, patches ordered merge-block by merge-block (as the processor emits them)."""
    out = []
    for t, h, w in grids:
        hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hp, wp = hp.reshape(shape).transpose(1, 2).flatten(), wp.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_index(
    grids: list[tuple[int, int, int]], merge: int, window_size: int, patch: int
) -> tuple[torch.Tensor, list[int]]:
    """The merged tokens reordered window by window ([tokens]) and the windows' cumulative patch counts."""
    win = window_size // merge // patch  # merged tokens per window side
    unit = merge * merge
    index, cu, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = F.pad(idx, (0, pw, 0, ph), "constant", -100)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        lens = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + base)
        for n in (lens.cumsum(0) * unit + cu[-1]).tolist():
            if n != cu[-1]:
                cu.append(n)
        base += t * gh * gw
    return torch.cat(index), cu


# ------------------------------------------------------------------ image preprocessing (Pillow + torch)


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


@dataclass(frozen=True)
class ProcessedImage:
    pixels: torch.Tensor  # [patches, C * T * P * P] f32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    num_tokens: int  # placeholder tokens in the prompt


class ImageProcessor:
    """Qwen2-VL's image processor (transformers' PIL one): RGB (alpha over white), bicubic resize to
    `smart_resize`, x / 255, CLIP mean/std, patches in merge-block order, the frame repeated to 2."""

    def __init__(self, cfg: ModelConfig, pre: Mapping[str, Any] | None = None) -> None:
        v = cfg.extra["vision"]
        pre = dict(pre or cfg.extra.get("preprocessor") or {})  # a GGUF's: from its mmproj (gguf_config)
        size = pre.get("size") or {}
        self.min_pixels = int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
        self.max_pixels = int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        self.patch, self.merge = v["patch_size"], v["spatial_merge_size"]
        self.temporal = v["temporal_patch_size"]
        self.mean = torch.tensor(pre.get("image_mean") or CLIP_MEAN, dtype=torch.float64)[:, None, None]
        self.std = torch.tensor(pre.get("image_std") or CLIP_STD, dtype=torch.float64)[:, None, None]

    def grid_for(self, h: int, w: int) -> tuple[int, int]:
        rh, rw = smart_resize(h, w, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return rh // self.patch, rw // self.patch

    def __call__(self, image: Any) -> ProcessedImage:
        from PIL import Image

        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
        gh, gw = self.grid_for(image.height, image.width)
        image = image.resize((gw * self.patch, gh * self.patch), resample=Image.Resampling.BICUBIC)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
        x = x.permute(2, 0, 1).double() * (1 / 255)
        x = (
            (x.float().double() - self.mean) / self.std
        ).float()  # [C, H, W] (rescale in f64 -> f32, as numpy)
        m, p, C = self.merge, self.patch, 3
        x = x.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # gh', gw', m, m, C, p, p
        x = x[:, :, :, :, :, None].expand(*x.shape[:5], self.temporal, p, p)
        pixels = x.reshape(gh * gw, C * self.temporal * p * p).contiguous()
        return ProcessedImage(pixels, (1, gh, gw), gh * gw // (m * m))


# ------------------------------------------------------------------ the model


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    model_types = ("qwen2_5_vl", "qwen2_5_vl_text")
    gguf_archs = {"qwen2vl": "qwen2_5_vl"}
    gguf_projectors = {GGUF_PROJECTOR: "qwen2vl"}  # an mmproj's projector type -> the text GGUF it pairs with
    takes_images = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)  # the Qwen2 text model
        self.visual = VisionTower(cfg.extra["vision"])

    def encode_images(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Every image's patches -> one embedding per placeholder token, images in order: [tokens, H]."""
        return self.visual(torch.cat(pixels), grids)

    # ---------------------------------------------------------------- the contract

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
    def from_checkpoint(cls, name: str, w: torch.Tensor) -> torch.Tensor:
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

    # ---------------------------------------------------------------- images (multimodal.py)

    @classmethod
    def image_processor(cls, cfg: ModelConfig, pre: Mapping[str, Any] | None = None) -> ImageProcessor:
        return ImageProcessor(cfg, pre)

    @classmethod
    def image_token_id(cls, cfg: ModelConfig) -> int:
        return cfg.extra["image_token_id"]

    @classmethod
    def rope_positions(
        cls, cfg: ModelConfig, ids: list[int], images: list[ProcessedImage]
    ) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, len(ids)] of an expanded prompt, and the delta of the positions after it
        (transformers' get_rope_index for images)."""
        merge, tok = cfg.extra["vision"]["spatial_merge_size"], cls.image_token_id(cfg)
        parts, cur, i, k = [], 0, 0, 0
        n = len(ids)
        while i < n:
            j = i
            if ids[i] == tok:
                _, gh, gw = images[k].grid
                lh, lw = gh // merge, gw // merge
                hh, ww = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
                parts.append(
                    torch.stack([torch.zeros(lh * lw, dtype=torch.long), hh.flatten(), ww.flatten()]) + cur
                )
                cur += max(lh, lw)
                i, k = i + lh * lw, k + 1
                continue
            while j < n and ids[j] != tok:
                j += 1
            parts.append(torch.arange(cur, cur + j - i).expand(3, -1))
            cur += j - i
            i = j
        pos = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        return pos, int(pos.max()) + 1 - n if n else 0

    # ---------------------------------------------------------------- the plan (placement/estimate.py)

    @classmethod
    def image_tokens(cls, cfg: ModelConfig, edge: int) -> int:
        """Placeholder tokens of a square image of `edge` pixels (`PLAN_MAX_PIXELS`)."""
        gh, gw = ImageProcessor(cfg, {"max_pixels": PLAN_MAX_PIXELS}).grid_for(edge, edge)
        return gh * gw // cfg.extra["vision"]["spatial_merge_size"] ** 2

    @classmethod
    def vision_activation_bytes(cls, cfg: ModelConfig, dtype_bytes: int, images: int, edge: int) -> int:
        """Peak transients of encoding `images` images of `edge` pixels at once: per patch the block input and
        residual, qkv, rotated q/k (f32), attention output, the MLP's gate/up/act; plus the f32 pixels."""
        v = cfg.extra["vision"]
        gh, gw = ImageProcessor(cfg, {"max_pixels": PLAN_MAX_PIXELS}).grid_for(edge, edge)
        n = images * gh * gw
        d, i = v["hidden_size"], v["intermediate_size"]
        per_patch = dtype_bytes * (2 * d + 3 * d + d + 3 * i) + 4 * 4 * d
        pixels = n * v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * 4
        return n * per_patch + pixels


MODEL = Qwen2_5_VLForConditionalGeneration

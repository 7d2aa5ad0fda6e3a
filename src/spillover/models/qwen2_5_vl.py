"""Qwen2.5-VL: the modules of the architecture models/arch/qwen2_5_vl.py describes: a Qwen2 decoder (Llama's
modules) fed by a native-resolution ViT (windowed attention, 2-D rope, a 2x2 patch merger), the image
processor, and the multimodal rope positions of a prompt.

- Images: 14 x 14 x 2-frame patches -> `patch_embed` (a Conv3d whose kernel is its stride: one matmul) ->
  `depth` blocks (RMSNorm, attention with 2-D rope over (row, column), SiLU MLP with biases). Blocks in
  `fullatt_block_indexes` attend over the whole image, the others inside windows of `window_size` pixels;
  tokens are reordered window by window first (`window_index`) and back after the merger, which turns each
  2 x 2 group of patches into one text-model token (`out_hidden_size`).
- Multimodal rope: a token has (temporal, height, width) positions; text tokens have three equal ones
  (`rope_positions`; layers/rotary.py rotates each `mrope_section` by one of them). After an image, text
  positions continue from its largest position + 1, so decode is plain rope at p + delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spillover.config import ModelConfig
from spillover.layers.norm import RMSNorm
from spillover.models.arch.qwen2_5_vl import CLIP_MEAN, CLIP_STD, Qwen2_5_VL, patch_grid, pixel_range
from spillover.models.llama import LlamaForCausalLM

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


@dataclass(frozen=True)
class ProcessedImage:
    pixels: torch.Tensor  # [patches, C * T * P * P] f32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    num_tokens: int  # placeholder tokens in the prompt


class ImageProcessor:
    """Qwen2-VL's image processor (transformers' PIL one): RGB (alpha over white), bicubic resize to
    `smart_resize`, x / 255, CLIP mean/std, patches in merge-block order, the frame repeated to 2."""

    def __init__(self, cfg: ModelConfig, pre: Mapping[str, Any] | None = None) -> None:
        self.v = v = cfg.extra["vision"]
        pre = dict(pre or cfg.extra.get("preprocessor") or {})  # a GGUF's: from its mmproj (gguf_config)
        self.min_pixels, self.max_pixels = pixel_range(pre)
        self.patch, self.merge = v["patch_size"], v["spatial_merge_size"]
        self.temporal = v["temporal_patch_size"]
        self.mean = torch.tensor(pre.get("image_mean") or CLIP_MEAN, dtype=torch.float64)[:, None, None]
        self.std = torch.tensor(pre.get("image_std") or CLIP_STD, dtype=torch.float64)[:, None, None]

    def grid_for(self, h: int, w: int) -> tuple[int, int]:
        return patch_grid(self.v, h, w, (self.min_pixels, self.max_pixels))

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


class Qwen2_5_VLForConditionalGeneration(Qwen2_5_VL, LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)  # the Qwen2 text model
        self.visual = VisionTower(cfg.extra["vision"])

    def encode_images(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Every image's patches -> one embedding per placeholder token, images in order: [tokens, H]."""
        return self.visual(torch.cat(pixels), grids)

    # ---------------------------------------------------------------- images (multimodal.py)

    @classmethod
    def image_processor(cls, cfg: ModelConfig, pre: Mapping[str, Any] | None = None) -> ImageProcessor:
        return ImageProcessor(cfg, pre)

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


MODEL = Qwen2_5_VLForConditionalGeneration

"""Llama 3.2 Vision (mllama): the modules of the architecture models/arch/mllama.py describes, a Llama decoder
with gated cross-attention layers whose K/V come from the image, fed by a tiled ViT.

- Images (`ImageProcessor`, equal to transformers' PIL processor): resized to fit the best canvas of up to
  `max_num_tiles` tiles of `image_size` px (bilinear), zero-padded to the canvas, normalized, split into tiles,
  padded with empty tiles to `max_num_tiles`; the canvas shape is the aspect-ratio id.
- The vision model (`vision_model`): a patch conv, a class token, gated tile and position embeddings, a
  LayerNorm ViT whose outputs at `intermediate_layers_indices` are kept, then a gated "global" ViT over all
  tiles; final and intermediate states concatenated per patch -> `multi_modal_projector` -> text width.
  Its attention mask is transformers' (padding patches are masked only as keys of padding queries).
- Each image is one `<|image|>` token. Layers in `cross_attention_layers` attend from the text to the vision
  states of the images visible at each token (an image from its token until the next image, consecutive images
  together; tokens with none visible attend to every vision token and drop their MLP output, as transformers).
  These layers keep no KV cache of the text (`KVSpec(0, ...)`); their K/V of the image are computed once per
  sequence and layer (`MMInput.cross_kv`). A sequence without images passes them unchanged.
- The tower + projector are the stage `vision`. Prefix sharing is off for this model (tokens before an image
  attend to it through the cross layers) and decode runs without CUDA graphs (per-sequence cross K/V).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spillover.config import ModelConfig
from spillover.layers.norm import RMSNorm
from spillover.models.arch.mllama import Mllama, aspect_ratios
from spillover.models.base import LayerInput
from spillover.models.llama import MLP, DecoderLayer, LlamaForCausalLM

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------ image preprocessing


def best_canvas(h: int, w: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """transformers' get_optimal_tiled_canvas: the smallest upscale, else the largest downscale; least area."""
    sizes = np.array(aspect_ratios(max_tiles)) * tile
    th, tw = sizes.T
    scales = np.where(tw / w > th / h, th / h, tw / w)
    up = scales[scales >= 1]
    pick = np.min(up) if len(up) else np.max(scales[scales < 1])
    chosen = sizes[scales == pick]
    return tuple(int(v) for v in chosen[np.argmin(chosen[:, 0] * chosen[:, 1])])


def fit_to_canvas(h: int, w: int, ch: int, cw: int, tile: int) -> tuple[int, int]:
    tw, th = int(np.clip(w, tile, cw)), int(np.clip(h, tile, ch))
    sh, sw = th / h, tw / w
    if sw < sh:
        return min(math.floor(h * sw) or 1, th), tw
    return th, min(math.floor(w * sh) or 1, tw)


@dataclass(frozen=True)
class ProcessedImage:
    pixels: torch.Tensor  # [max_tiles, C, tile, tile] f32 (empty tiles zero)
    grid: tuple[int, int, int]  # (aspect-ratio id, tiles high, tiles wide)
    num_tokens: int = 1  # one <|image|> token


class ImageProcessor:
    def __init__(self, cfg: ModelConfig, pre: Mapping[str, Any] | None = None) -> None:
        v, pre = cfg.extra["vision"], dict(pre or {})
        self.tile = int((pre.get("size") or {}).get("height") or v["image_size"])
        self.max_tiles = int(pre.get("max_image_tiles") or v["max_num_tiles"])
        self.resample = int(pre.get("resample", 2))
        self.mean = torch.tensor(pre.get("image_mean") or CLIP_MEAN, dtype=torch.float64)[:, None, None]
        self.std = torch.tensor(pre.get("image_std") or CLIP_STD, dtype=torch.float64)[:, None, None]

    def __call__(self, image: Any) -> ProcessedImage:
        from PIL import Image

        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
        ch, cw = best_canvas(image.height, image.width, self.max_tiles, self.tile)
        nh, nw = ch // self.tile, cw // self.tile
        h, w = fit_to_canvas(image.height, image.width, ch, cw, self.tile)
        image = image.resize((w, h), resample=Image.Resampling(self.resample))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
        x = F.pad(x, (0, cw - w, 0, ch - h))  # zeros, before normalizing (as transformers)
        x = ((x.double() * (1 / 255)).float().double() - self.mean) / self.std
        t = self.tile
        tiles = x.float().reshape(3, nh, t, nw, t).permute(1, 3, 0, 2, 4).reshape(nh * nw, 3, t, t)
        pixels = torch.zeros(self.max_tiles, 3, t, t)
        pixels[: nh * nw] = tiles
        return ProcessedImage(pixels, (aspect_ratios(self.max_tiles).index((nh, nw)) + 1, nh, nw))


# ------------------------------------------------------------------ the vision model


class VisionAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x: [B, L, D]
        B, L, D = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.heads, -1).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                           attn_mask=mask)  # fmt: skip
        return self.o_proj(o.transpose(1, 2).reshape(B, L, D))


class VisionMLP(nn.Module):
    def __init__(self, d: int, inter: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, inter), nn.Linear(inter, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, v: Mapping[str, Any], gated: bool) -> None:
        super().__init__()
        d = v["hidden_size"]
        self.input_layernorm = nn.LayerNorm(d, eps=v["norm_eps"])
        self.self_attn = VisionAttention(d, v["attention_heads"])
        self.post_attention_layernorm = nn.LayerNorm(d, eps=v["norm_eps"])
        self.mlp = VisionMLP(d, v["intermediate_size"])
        self.gated = gated
        if gated:
            self.gate_attn, self.gate_ffn = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * a if self.gated else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * m if self.gated else m)


class VisionEncoder(nn.Module):
    def __init__(self, v: Mapping[str, Any], n: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(v, gated) for _ in range(n))


class TileEmbedding(nn.Module):
    """A gated embedding per aspect ratio, added to every tile (`pre_/post_tile_positional_embedding`)."""

    def __init__(self, v: Mapping[str, Any]) -> None:
        super().__init__()
        self.tiles, self.d = v["max_num_tiles"], v["hidden_size"]
        self.embedding = nn.Embedding(v["max_aspect_ratio_id"] + 1, self.tiles * self.d)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:  # x: [N, tiles, P, D]
        return x + self.embedding(ar).reshape(-1, self.tiles, 1, self.d) * self.gate.tanh()


class PositionEmbedding(nn.Module):
    def __init__(self, v: Mapping[str, Any]) -> None:
        super().__init__()
        self.tiles, self.d = v["max_num_tiles"], v["hidden_size"]
        self.patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.patches, self.d))
        self.tile_embedding = nn.Embedding(v["max_aspect_ratio_id"] + 1, self.tiles * self.patches * self.d)

    def forward(self, x: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:  # x: [N, tiles, P, D]
        g = self.gate.tanh()
        x = x + ((1 - g) * self.embedding).view(1, 1, self.patches, self.d)
        return x + g * self.tile_embedding(ar).reshape(-1, self.tiles, self.patches, self.d)


class VisionModel(nn.Module):
    def __init__(self, v: Mapping[str, Any]) -> None:
        super().__init__()
        self.v = dict(v)
        d, p = v["hidden_size"], v["patch_size"]
        self.patch_embedding = nn.Module()
        self.patch_embedding.weight = nn.Parameter(torch.empty(d, v["num_channels"], p, p))
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.gated_positional_embedding = PositionEmbedding(v)
        self.pre_tile_positional_embedding = TileEmbedding(v)
        self.post_tile_positional_embedding = TileEmbedding(v)
        self.layernorm_pre = nn.LayerNorm(d)
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = VisionEncoder(v, v["num_hidden_layers"], False)
        self.global_transformer = VisionEncoder(v, v["num_global_layers"], True)

    def forward(self, pixels: torch.Tensor, ar: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """pixels [N, T, C, S, S], aspect-ratio ids [N], real tiles [N] -> [N, T, patches + 1, out_dim]."""
        w = self.patch_embedding.weight
        N, T = pixels.shape[:2]
        x = F.conv2d(pixels.flatten(0, 1).to(w.device, w.dtype), w, stride=self.v["patch_size"])
        x = x.flatten(2).transpose(1, 2)  # [N*T, P, D]
        D = x.shape[-1]
        x = self.pre_tile_positional_embedding(x.reshape(N, T, -1, D), ar).reshape(N * T, -1, D)
        x = torch.cat([self.class_embedding.expand(N * T, 1, D), x], dim=1)
        P = x.shape[1]
        x = self.layernorm_pre(self.gated_positional_embedding(x.reshape(N, T, P, D), ar))
        pad = (8 - P % 8) % 8
        x = F.pad(x, (0, 0, 0, pad))
        Lt = P + pad
        # transformers' mask: a key is hidden only from queries that are padding too (padding tiles/patches)
        is_pad = torch.arange(T, device=x.device)[None, :] >= tiles[:, None].to(x.device)  # [N, T]
        is_pad = is_pad[:, :, None].expand(N, T, Lt).clone()
        is_pad[:, :, P:] = True
        is_pad = is_pad.reshape(N, T * Lt)
        mask = ~(is_pad[:, :, None] & is_pad[:, None, :])[:, None]  # [N, 1, T*Lt, T*Lt] True: attend
        x = x.reshape(N, T * Lt, D)
        picks = self.v["intermediate_layers_indices"]
        kept = {}
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, mask)
            if i in picks:
                kept[i] = x
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(N, T, Lt, D), ar).reshape(N, T * Lt, D)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        x = x.reshape(N, T, Lt, D)[:, :, :P]
        inter = torch.stack([kept[i] for i in picks], -1).reshape(N, T, Lt, -1)[
            :, :, :P
        ]  # (D, layer) interleaved
        return torch.cat([x, inter], dim=-1)


# ------------------------------------------------------------------ cross-attention layers


@dataclass
class CrossRows:
    """One sequence's rows in a step, for the cross-attention layers."""

    row: int
    q_len: int
    mm: Any  # multimodal.MMInput: embeds = the projected vision states [V, H]; cross_kv: layer -> (k, v)
    allowed: torch.Tensor  # [q_len, V] bool: the vision tokens each row attends to
    keep: torch.Tensor  # [q_len, 1] 0/1: rows with no image visible drop their MLP output


class CrossAttentionLayer(nn.Module):
    graph_safe = False  # per-sequence image K/V: its segment decodes without CUDA graphs

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = nn.Module()
        a = self.cross_attn
        a.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        a.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        a.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        a.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        a.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        a.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def _kv(self, mm: Any, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V of a sequence's images, [n_kv, V, hd] each, made once per sequence."""
        kv = mm.cross_kv.get(self.index)
        if kv is None:
            a, s = self.cross_attn, mm.embeds.to(dev)
            V = s.shape[0]
            k = a.k_norm(a.k_proj(s).view(V, self.nkv, self.hd)).transpose(0, 1)
            v = a.v_proj(s).view(V, self.nkv, self.hd).transpose(0, 1)
            kv = mm.cross_kv[self.index] = (k, v)
        return kv

    def forward(self, x: torch.Tensor, li: LayerInput) -> torch.Tensor:  # x: [T, H]
        if not li.cross:
            return x  # no sequence in this step has an image
        out = x.clone()
        for c in li.cross:
            h = x[c.row : c.row + c.q_len]
            k, v = (
                t.repeat_interleave(self.nh // self.nkv, 0) for t in self._kv(c.mm, x.device)
            )  # [nh, V, hd]
            a = self.cross_attn
            q = a.q_norm(a.q_proj(self.input_layernorm(h)).view(c.q_len, self.nh, self.hd)).transpose(0, 1)
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=c.allowed[None, None])
            h = h + self.cross_attn_attn_gate.tanh() * a.o_proj(o[0].transpose(0, 1).reshape(c.q_len, -1))
            m = self.mlp(self.post_attention_layernorm(h)) * c.keep
            out[c.row : c.row + c.q_len] = h + self.cross_attn_mlp_gate.tanh() * m
        return out


# ------------------------------------------------------------------ the model


class MllamaForConditionalGeneration(Mllama, LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        cross = set(cfg.extra["cross_attention_layers"])
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        self.layers = nn.ModuleList(
            CrossAttentionLayer(cfg, i) if i in cross else DecoderLayer(cfg)
            for i in range(cfg.num_hidden_layers)
        )
        v = cfg.extra["vision"]
        self.vision_model = VisionModel(v)
        self.multi_modal_projector = nn.Linear(v["vision_output_dim"], cfg.hidden_size, bias=True)

    def encode_images(self, pixels: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """A sequence's images -> the projected vision states [images * tiles * patches, H]."""
        ar = torch.tensor([g[0] for g in grids])
        tiles = torch.tensor([g[1] * g[2] for g in grids])
        states = self.vision_model(
            torch.stack(pixels), ar.to(self.multi_modal_projector.weight.device), tiles
        )
        out = self.multi_modal_projector(states.to(self.multi_modal_projector.weight.device))
        return out.reshape(-1, out.shape[-1])

    @classmethod
    def cross_rows(cls, cfg: ModelConfig, mm: Any, start: int, q_len: int, prompt_len: int) -> tuple:
        """(allowed [q_len, V] bool, keep [q_len, 1]) for tokens start.. of a sequence (generated tokens see what
        its last prompt token sees)."""
        v = cfg.extra["vision"]
        T, P = v["max_num_tiles"], (v["image_size"] // v["patch_size"]) ** 2 + 1
        p = torch.arange(start, start + q_len).clamp(max=prompt_len - 1)[:, None]  # [q, 1]
        a = torch.tensor([r[0] for r in mm.cross])[None, :]
        b = torch.tensor([r[1] for r in mm.cross])[None, :]
        sees = (p >= a) & (p < b)  # [q, images]
        tiles = torch.tensor([g[1] * g[2] for g in mm.grids])
        per_tile = sees[:, :, None] & (torch.arange(T)[None, None, :] < tiles[None, :, None])  # [q, img, T]
        allowed = per_tile[:, :, :, None].expand(-1, -1, -1, P).reshape(q_len, -1)
        keep = allowed.any(-1, keepdim=True)
        return allowed | ~keep, keep.float()

    # ---------------------------------------------------------------- images (multimodal.py)

    @classmethod
    def image_processor(cls, cfg: ModelConfig, pre: Mapping[str, Any] | None = None) -> ImageProcessor:
        return ImageProcessor(cfg, pre)

    @classmethod
    def rope_positions(cls, cfg: ModelConfig, ids: list[int], images: list[Any]) -> tuple[None, int]:
        return None, 0  # plain rope


MODEL = MllamaForConditionalGeneration

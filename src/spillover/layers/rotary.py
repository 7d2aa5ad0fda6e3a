"""Rotary position embeddings with the scaling types of Llama-family configs.

rope_type: default, linear, dynamic (NTK), llama3, yarn. `inv_freq(...)` follows the formulas of the
original papers as implemented by the reference checkpoints' configs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from spillover.config import ModelConfig
from spillover.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, smoothed, out)


def _yarn(base: float, dim: int, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s.get("factor") or max_pos / s["original_max_position_embeddings"]
    orig = s.get("original_max_position_embeddings", max_pos)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, mad = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, mad) if m and mad else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp  # share of extrapolation (original frequencies)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, float(attn)


class Rotary:
    """Computes cos/sin tables for given positions. Stateless apart from the frequencies."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.base = cfg.rope_theta
        self.max_pos = cfg.max_position_embeddings
        s = dict(cfg.rope_scaling or {})
        self.rope_type = s.get("rope_type", s.get("type", "default"))
        if self.rope_type == "mrope":  # Qwen2-VL's old spelling of default rope with mrope_section
            self.rope_type = "default"
        # multimodal rope (Qwen2-VL): frequency sections rotated by the temporal, height, width positions
        self.mrope_section = tuple(s.get("mrope_section") or ())
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}"
            )
        self.scaling = s
        self.attention_scaling = 1.0
        inv = _base_inv_freq(self.base, self.dim)
        if self.rope_type == "linear":
            inv = inv / s["factor"]
        elif self.rope_type == "llama3":
            inv = _llama3(inv, s)
        elif self.rope_type == "yarn":
            inv, self.attention_scaling = _yarn(self.base, self.dim, s, self.max_pos)
        self.inv_freq = inv
        self._on_device: dict[tuple[torch.device, int], torch.Tensor] = {}

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        if self.rope_type != "dynamic" or seq_len <= self.max_pos:
            return self.inv_freq
        factor = self.scaling["factor"]
        base = self.base * ((factor * seq_len / self.max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _base_inv_freq(base, self.dim)

    def cos_sin(
        self, positions: torch.Tensor, max_len: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> cos, sin: [T, rot_dim] (rotate-half layout; sin's first half negated so that
        rotation is x * cos + roll(x, rot_dim / 2) * sin, four kernels). Multimodal rope: positions [3, T]
        (temporal, height, width); frequency section j turns with positions[j % 3]."""
        inv = self._inv_freq_for(max_len)
        key = (positions.device, inv.data_ptr())
        if key not in self._on_device:  # keep a copy per device: no host->device copy per step (graph-safe)
            self._on_device[key] = inv.to(positions.device)
        freqs = positions.float()[..., None] * self._on_device[key]  # [T, dim/2] ([3, T, dim/2] multimodal)
        if positions.dim() == 2:
            parts = freqs.split(list(self.mrope_section), dim=-1) if self.mrope_section else (freqs[0],)
            freqs = torch.cat([p[j % 3] if p.dim() == 3 else p for j, p in enumerate(parts)], dim=-1)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, rot_dim] from `Rotary.cos_sin`. Rotates the first rot_dim channels."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if rot < x.shape[-1]:
        xr, xp = x[..., :rot], x[..., rot:]
        return torch.cat([xr * cos + xr.roll(rot // 2, -1) * sin, xp], dim=-1)
    return x * cos + x.roll(rot // 2, -1) * sin

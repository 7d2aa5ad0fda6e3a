"""Dataclasses passed between stages: the model's shape, mapping parameters, engine settings.

Validation lives here and raises `ConfigError` with a message users can act on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spillover.errors import ConfigError

DTYPES = ("auto", "bf16", "f16", "f32")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, in Hugging Face config.json terms."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    partial_rotary_factor: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    architectures: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # architecture-specific fields (models/arch/)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict (text part only; nested `text_config` is used when present)."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = {**cfg["text_config"], "architectures": cfg.get("architectures", [])}
        model_type = cfg.get("model_type", "")
        rope_theta = cfg.get("rope_theta", 10000.0)
        rope_scaling = cfg.get("rope_scaling")
        if isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5 folds both into rope_parameters
            rp = cfg["rope_parameters"]
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", rp.get("type", "default")) != "default":
                rope_scaling = rp
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_list = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
                partial_rotary_factor=float(cfg.get("partial_rotary_factor", 1.0)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos_list,
                architectures=tuple(cfg.get("architectures") or ()),
            )
        except KeyError as e:
            raise ConfigError(
                f"config.json lacks the field {e.args[0]!r}; is this a decoder-only language model?"
            ) from None

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class AutoDeviceMapParams:
    """The largest sizes the user expects; they shape the device map but are not hard limits at run time."""

    max_seq_len: int = 4096
    max_batch_size: int = 1
    max_num_images: int = 1
    max_image_length: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "max_batch_size", "max_num_images", "max_image_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def parse_bytes(text: str | int) -> int:
    """'8GiB', '8 GB', '512MiB', '1.5TiB', 1234 -> bytes. GB/MB are decimal, GiB/MiB binary (as accelerate)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"a memory size cannot be negative: {text}")
        return text
    s = str(text).strip().replace(" ", "")
    units = {
        "": 1, "b": 1,
        "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
        "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
        "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    }  # fmt: skip
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    num, unit = s[:i], s[i:].lower()
    try:
        value = float(num)
    except ValueError:
        raise ConfigError(
            f"cannot read the memory size {text!r}; write it like 8GiB, 512MiB or 20GB"
        ) from None
    if unit not in units or value < 0:
        raise ConfigError(f"cannot read the memory size {text!r}; write it like 8GiB, 512MiB or 20GB")
    return int(value * units[unit])


def resolve_dtype_name(name: str) -> str:
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name

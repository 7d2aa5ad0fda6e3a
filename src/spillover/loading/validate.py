"""Model-file sanity checks: well-formed files whose numbers cannot describe a working model.

Three entry points, each raising `ModelLoadError` with the offending field named:

- `check_gguf_metadata(md, path)`: a GGUF's hyper-parameters, before a `ModelConfig` is built from them
  (head_count 0 would otherwise divide by zero, a negative epsilon would load and produce NaNs);
- `check_hf_config(raw, path)`: a config.json's top-level shape and numeric fields (null, lists, negatives);
- `check_source(source)`: the resulting `ModelConfig` against itself (heads divide evenly, rope base > 0) and
  against the tensors the file really holds (layer count, projection shapes), so that `block_count: 0` on a
  file with 30 layers of tensors, or `block_count: 2**31`, is refused before anything is planned or allocated.
"""

from __future__ import annotations

import math
from typing import Any

from spillover.errors import ModelLoadError

MAX_LAYERS = 10_000  # far above any real model; beyond this the number is corrupt, not ambitious

# GGUF "<arch>." keys: (key, kind) with kind "count" (int >= 1), "count0" (int >= 0), "pos" (float > 0)
_GGUF_FIELDS = (
    ("block_count", "count"),
    ("embedding_length", "count"),
    ("feed_forward_length", "count"),
    ("attention.head_count", "count"),
    ("attention.head_count_kv", "count"),
    ("attention.key_length", "count"),
    ("context_length", "count"),
    ("vocab_size", "count"),
    ("rope.freq_base", "pos"),
    ("attention.layer_norm_rms_epsilon", "pos"),
)
_HF_COUNTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
_HF_POSITIVE = ("rms_norm_eps", "rope_theta")


def _bad(path: Any, field: str, value: Any, want: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: {field} is {value!r} but must be {want}; the model file is corrupt or wrong"
    )


def _check_value(path: Any, field: str, value: Any, kind: str, allow_none: bool) -> None:
    if value is None:
        if allow_none:
            return
        raise _bad(path, field, value, "a number")
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(path, field, value, "a positive integer")
    else:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)
        ):
            raise _bad(path, field, value, "a positive number")


def check_gguf_metadata(md: dict[str, Any], path: Any) -> None:
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        return  # the caller reports a missing architecture
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if f"{arch}.{key}" not in md:
            raise ModelLoadError(f"{path} lacks {arch}.{key}; the model file is incomplete")
    for key, kind in _GGUF_FIELDS:
        full = f"{arch}.{key}"
        if full in md and not (key == "attention.head_count" and isinstance(md[full], list)):
            _check_value(path, full, md[full], kind, allow_none=False)


def check_hf_config(raw: Any, path: Any) -> None:
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object (a config), not a {type(raw).__name__}")
    cfg = raw
    if isinstance(raw.get("text_config"), dict) and "hidden_size" not in raw:
        cfg = raw["text_config"]
    for key in _HF_COUNTS:
        if key in cfg:
            optional = key in ("num_key_value_heads", "head_dim", "max_position_embeddings")
            _check_value(path, key, cfg[key], "count", allow_none=optional)
    for key in _HF_POSITIVE:
        if key in cfg:
            _check_value(path, key, cfg[key], "pos", allow_none=False)


def check_config(cfg: Any, path: Any) -> None:
    """A ModelConfig's fields are consistent with each other."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):  # fmt: skip
        _check_value(path, key, getattr(cfg, key), "count", allow_none=False)
    for key in ("rms_norm_eps", "rope_theta"):
        _check_value(path, key, getattr(cfg, key), "pos", allow_none=False)
    if cfg.num_hidden_layers > MAX_LAYERS:
        raise _bad(path, "the layer count", cfg.num_hidden_layers, f"at most {MAX_LAYERS}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelLoadError(
            f"{path}: {cfg.num_attention_heads} attention heads cannot be shared by {cfg.num_key_value_heads} "
            "key/value heads (the first must be a multiple of the second); the model file is corrupt or wrong"
        )


def _layer_count(tensors: dict[str, Any]) -> int:
    top = -1
    for name in tensors:
        if name.startswith("model.layers."):
            i = name.split(".", 3)[2]
            if i.isdigit():
                top = max(top, int(i))
    return top + 1


def check_source(src: Any) -> None:
    """A ModelSource's config, and its config against its tensors (when it has any)."""
    cfg, path, tensors = src.config, src.path, src.tensors
    check_config(cfg, path)
    if not tensors:
        return
    layers = _layer_count(tensors)
    if layers != cfg.num_hidden_layers:
        raise ModelLoadError(
            f"{path}: the config says {cfg.num_hidden_layers} layers but the file holds tensors for {layers}; "
            "the model file is corrupt or wrong"
        )
    expect = {
        "model.embed_tokens.weight": (None, cfg.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size),
        "model.layers.0.self_attn.v_proj.weight": (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size),
    }
    for name, want in expect.items():
        t = tensors.get(name)
        if t is None or len(t.shape) != 2:
            continue
        if any(w is not None and w != got for w, got in zip(want, t.shape, strict=True)):
            shown = tuple("*" if w is None else w for w in want)
            raise ModelLoadError(
                f"{path}: tensor {name} has shape {tuple(t.shape)} but the config (hidden {cfg.hidden_size}, "
                f"{cfg.num_attention_heads} heads, {cfg.num_key_value_heads} key/value heads, head_dim "
                f"{cfg.head_dim}) implies {shown}; the model file is corrupt or wrong"
            )

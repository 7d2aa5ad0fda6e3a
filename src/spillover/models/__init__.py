"""Model registry keyed by config.json's model_type. One file per architecture family."""

from __future__ import annotations

import re
from typing import Any

from spillover.errors import UnsupportedModelError

# model_type -> module name in spillover.models
REGISTRY: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}


def check_supported(model_type: str, where: Any = None) -> None:
    if model_type not in REGISTRY:
        src = f" ({where})" if where is not None else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r}{src} is not supported; supported: {', '.join(sorted(REGISTRY))}"
        )


def model_module(model_type: str) -> Any:
    import importlib

    check_supported(model_type)
    return importlib.import_module(f"spillover.models.{REGISTRY[model_type]}")


_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
_SKIP = re.compile(r"rotary_emb\.inv_freq$|\.masked_bias$|\.attn\.bias$")


def hf_tensor_name(key: str) -> str | None:
    """Normalise a checkpoint key to the plain HF decoder name; None for tensors the engine does not use."""
    if _SKIP.search(key):
        return None
    for p in _PREFIXES:
        if key.startswith(p):
            rest = key[len(p) :]
            return rest if rest.startswith("lm_head") else "model." + rest
    return key

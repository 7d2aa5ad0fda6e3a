"""Model registry: config.json's model_type -> its architecture. An architecture is a description
(`models/arch/<name>.py`, its `ARCH`: config, checkpoint tensors, GGUF names, KV specs, stages; no torch) and
its modules (`models/<name>.py`, its `MODEL`: the nn.Module class, which inherits the description). The planner
and the file readers ask `architecture()`; building a model asks `model_class()`. Adding an architecture: its
two files + one line here."""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from spillover.errors import UnsupportedModelError

if TYPE_CHECKING:
    from spillover.models.arch.base import Architecture
    from spillover.models.base import CausalLM

# model_type -> the architecture's name: its description models/arch/<name>.py and its modules models/<name>.py
REGISTRY: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma3_text": "gemma3", "gemma3": "gemma3",
    "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_vl_text": "qwen2_5_vl", "mllama": "mllama", "mllama_text_model": "mllama",
    "qwen3_moe": "qwen3_moe", "mixtral": "mixtral",
}  # fmt: skip


def check_supported(model_type: str, where: Any = None) -> None:
    if model_type not in REGISTRY:
        src = f" ({where})" if where is not None else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r}{src} is not supported; supported: {', '.join(sorted(REGISTRY))}"
        )


def architecture(model_type: str) -> type[Architecture]:
    """The description of a config.json model_type (UnsupportedModelError when there is none): all that the
    estimate, the planner and the file readers need. Imports no torch."""
    check_supported(model_type)
    return importlib.import_module(f"spillover.models.arch.{REGISTRY[model_type]}").ARCH


def model_class(model_type: str) -> type[CausalLM]:
    """The CausalLM subclass for a config.json model_type: the description and the modules (imports torch)."""
    check_supported(model_type)
    return importlib.import_module(f"spillover.models.{REGISTRY[model_type]}").MODEL


def _architectures() -> Iterator[type[Architecture]]:
    """Every architecture's description, in registry order (imported as the caller goes on; no torch)."""
    for name in dict.fromkeys(REGISTRY.values()):
        yield importlib.import_module(f"spillover.models.arch.{name}").ARCH


def gguf_model_type(arch: str, where: Any = None, md: Any = None) -> str:
    """The model_type of a GGUF general.architecture (and its metadata `md`: llama.cpp writes Mixtral as
    "llama" with an expert count)."""
    for cls in _architectures():
        if arch in cls.gguf_archs:
            return cls.gguf_model_type(md or {}, arch)
    check_supported(arch, where)  # raises with the list of supported types
    return arch


@functools.cache
def gguf_projectors() -> dict[str, str]:
    """Projector types of llama.cpp's mmproj files (`clip.projector_type`) an architecture reads -> the text GGUF
    architecture each pairs with (a description's `gguf_projectors`)."""
    out: dict[str, str] = {}
    for cls in _architectures():
        out |= cls.gguf_projectors
    return out


_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
_SKIP = re.compile(r"rotary_emb\.inv_freq$|\.masked_bias$|\.attn\.bias$")


def hf_tensor_name(key: str) -> str | None:
    """Normalise a checkpoint key to the plain HF decoder name; None for tensors the engine does not use."""
    if _SKIP.search(key):
        return None
    if key.startswith(("model.visual.", "model.vision_model.", "model.multi_modal_projector.")):
        return key[len("model.") :]  # a vision tower, as transformers >= 5 saves it
    for p in _PREFIXES:
        if key.startswith(p):
            rest = key[len(p) :]
            return rest if rest.startswith("lm_head") else "model." + rest
    return key

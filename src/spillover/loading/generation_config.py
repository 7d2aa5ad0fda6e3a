"""Sampling defaults a model ships in generation_config.json, as SamplingParams keywords.

Like vLLM's `--generation-config auto`, only the fields the file sets are used (temperature, top_p, top_k,
min_p, repetition_penalty, max_new_tokens); an explicit `"do_sample": false` means greedy, as transformers
reads it. Whoever asks for sampling explicitly (a flag, a request field, a SamplingParams) wins over these.
"""

from __future__ import annotations

from typing import Any

_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def model_sampling_defaults(gen: dict[str, Any] | None) -> dict[str, Any]:
    """SamplingParams keywords from a generation_config.json dict (values of the wrong type are skipped)."""
    out: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        v = (gen or {}).get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if name in ("top_k", "max_tokens"):
            if float(v).is_integer() and v >= (0 if name == "top_k" else 1):
                out[name] = int(v)
        elif v >= 0:
            out[name] = float(v)
    if (gen or {}).get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def resolve_sampling(
    explicit: dict[str, Any], model: dict[str, Any], fallback: dict[str, Any]
) -> dict[str, Any]:
    """Per field: the explicit value when not None, else the model's, else the fallback."""
    keys = set(explicit) | set(fallback)
    out = {}
    for k in keys:
        v = explicit.get(k)
        out[k] = v if v is not None else model.get(k, fallback.get(k))
    return out

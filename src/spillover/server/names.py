"""Clean model names for people and for the API: a .gguf file's stem, a directory's name, a hub id.

GGUF files carry a `general.name` written by converters ("Smollm2 135M 8k Lc100K Mix1 Ep2"), and a hub
download lives in a cache directory named by its commit hash: neither is what a user would type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def hub_id_from_path(path: str) -> str | None:
    """ "org/name" for a path inside the Hugging Face cache (…/models--org--name/snapshots/<hash>/…)."""
    for part in Path(path).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--") :].replace("--", "/", 1)
    return None


def clean_model_name(source: Any) -> str:
    """The name to show and serve for a ModelSource: hub id, else file stem (GGUF), else directory name."""
    path = getattr(source, "path", None) or ""
    if source.kind == "random" or not path:
        return source.name
    hub = hub_id_from_path(path)
    if hub:
        return hub
    p = Path(path)
    if source.kind == "gguf" or p.suffix == ".gguf":
        return p.stem
    if not p.exists() and "/" in path and not path.startswith(("/", ".", "~")):
        return path  # a hub id read remotely (headers only)
    return p.name or source.name


def model_aliases(source: Any, name: str) -> frozenset[str]:
    """Every name a client may send for this model: the served name, the clean name, the converter's name,
    the path as given and resolved, its file or directory name, and its stem."""
    out = {name, clean_model_name(source), source.name}
    path = getattr(source, "path", None)
    if path:
        p = Path(path)
        out |= {path, str(p.resolve()), p.name, p.stem}
        hub = hub_id_from_path(path)
        if hub:
            out |= {hub, hub.split("/")[-1]}
    return frozenset(a for a in out if a)

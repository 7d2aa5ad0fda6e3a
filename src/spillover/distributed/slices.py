"""Read a slice of one checkpoint tensor straight from the file: a rank never holds the whole tensor when its
slice can be cut before conversion.

- safetensors: `safe_open(...).get_slice` reads only the rows (or the row parts) asked for.
- GGUF: each row is stored on its own (quantized in blocks along the row), so a range of rows is a range of
  bytes; a range of columns is a range of blocks in every row when it starts and ends on a block boundary
  (always so for the usual sizes), otherwise the tensor is dequantized and cut.
- random sources (benchmarks): each tensor is drawn from a generator seeded by its name, then cut, so all
  ranks agree on the weights.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spillover.distributed.shard import Slice
from spillover.errors import ModelLoadError


class SliceReader:
    def __init__(self, src: Any) -> None:
        self.src = src
        self._where: dict[str, tuple[Path, str]] | None = None
        self._handles: dict[Path, Any] = {}
        self._gguf: Any = None

    def read(self, s: Slice, device: Any, dtype: torch.dtype) -> torch.Tensor:
        kind = self.src.kind
        if kind == "safetensors":
            t = self._safetensors(s)
        elif kind == "gguf":
            t = self._gguf_slice(s)
        elif kind == "random":
            return _cut(self._random(s.source, device, dtype), s).contiguous()
        else:
            raise ModelLoadError(
                f"{self.src.path} holds no weights (config only); it can be planned but not run"
            )
        return t.to(device=device, dtype=dtype)

    # ------------------------------------------------------------ safetensors

    def _safetensors(self, s: Slice) -> torch.Tensor:
        from safetensors import safe_open

        from spillover.loading.source import _safetensors_files, read_safetensors_header
        from spillover.models import hf_tensor_name

        if self._where is None:
            self._where = {}
            for path in _safetensors_files(Path(self.src.hf_dir)):
                for key in read_safetensors_header(path):
                    name = hf_tensor_name(key) if key != "__metadata__" else None
                    if name is not None:
                        self._where[name] = (path, key)
        path, key = self._where[s.source]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        sl = self._handles[path].get_slice(key)
        if s.dim is None:
            return sl[:]
        return sl[s.start : s.end] if s.dim == 0 else sl[:, s.start : s.end]

    # ------------------------------------------------------------ GGUF

    def _gguf_slice(self, s: Slice) -> torch.Tensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        from spillover.loading.dequant import dequantize
        from spillover.loading.gguf_file import read_gguf

        if self._gguf is None:
            _, infos, mm = read_gguf(self.src.path)
            to_hf, fix = _gguf_conventions(self.src.config)
            self._gguf = ({to_hf(t.name): t for t in infos}, mm, fix)
        by_name, mm, fix = self._gguf
        t = by_name[s.source]
        qtype = GGMLQuantizationType(t.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        raw = mm[t.offset : t.offset + t.nbytes]
        rows = t.shape[0]
        cols = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        if s.dim is None or len(t.shape) == 1:
            w = dequantize(_typed(raw, qtype.name), qtype, t.shape)
        elif s.dim == 0:
            rb = t.nbytes // rows
            part = raw[s.start * rb : s.end * rb]
            w = dequantize(_typed(part, qtype.name), qtype, (s.end - s.start, cols))
        elif s.start % block == 0 and s.end % block == 0:
            blocks = np.ascontiguousarray(
                raw.reshape(rows, cols // block, type_size)[:, s.start // block : s.end // block]
            )
            w = dequantize(_typed(blocks.reshape(-1), qtype.name), qtype, (rows, s.end - s.start))
        else:
            w = dequantize(_typed(raw, qtype.name), qtype, t.shape)[:, s.start : s.end]
        return fix(s.source, w)

    # ------------------------------------------------------------ random weights

    def _random(self, name: str, device: Any, dtype: torch.dtype) -> torch.Tensor:
        shape = self.src.tensors[name].shape
        g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
        w = torch.randn(shape, generator=g, device=device, dtype=dtype)
        return w.mul_(0.02).add_(1.0) if name.endswith("norm.weight") else w.mul_(0.02)


def _gguf_conventions(cfg: Any) -> tuple:
    """(llama.cpp name -> HF name, fix(name, slice)): the architecture's GGUF conventions applied to a slice.
    q/k rows are permuted within each head, so a slice of whole heads is fixed with its own head count."""
    from spillover import models

    def per_head(name: str, w: torch.Tensor) -> Any:
        heads = w.shape[0] // cfg.head_dim if name.endswith(("q_proj.weight", "k_proj.weight")) else None
        return cfg.replace(num_attention_heads=heads, num_key_value_heads=heads) if heads else cfg

    cls = models.model_class(cfg.model_type)  # the model contract (models/arch/base.py)
    return cls.gguf_name, lambda name, w: cls.from_gguf(name, w, per_head(name, w))


def _typed(raw: np.ndarray, qname: str) -> np.ndarray:
    if qname == "F32":
        return raw.view(np.float32)
    if qname == "F16":
        return raw.view(np.float16)
    return raw


def _cut(t: torch.Tensor, s: Slice) -> torch.Tensor:
    if s.dim is None:
        return t
    return t.narrow(s.dim, s.start, s.end - s.start)

"""GGUF block formats -> torch tensors. Fast torch paths for the common formats, the `gguf` package for the rest."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spillover.errors import UnsupportedModelError


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # b: [n_blocks, 34] = f16 scale + 32 int8
    d = b[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    q = b[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
    return q * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # b: [n_blocks, 18] = f16 scale + 16 bytes of nibbles (low nibbles: elements 0-15, high: 16-31)
    d = b[:, :2].contiguous().view(torch.float16).float()
    qs = b[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float() - 8.0  # [n, 32]
    return q * d


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # b: [n_blocks, 20] = f16 scale + f16 min + 16 bytes of nibbles
    d = b[:, :2].contiguous().view(torch.float16).float()
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    qs = b[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    return q * d + m


_FAST = {"Q8_0": (_q8_0, 34), "Q4_0": (_q4_0, 18), "Q4_1": (_q4_1, 20)}


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """Turn a GGUF tensor's raw data into a float tensor of `shape` (torch order). f16/bf16 stay as they are."""
    name = qtype.name
    if name in ("F32", "F16"):
        return torch.from_numpy(np.ascontiguousarray(data)).reshape(shape)
    if name == "BF16":
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape)
    if name in _FAST:
        fn, block_bytes = _FAST[name]
        raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).view(-1, block_bytes)
        return fn(raw).reshape(shape)
    try:
        import gguf

        qtype = gguf.GGMLQuantizationType(int(qtype))  # spillover's GGMLType or gguf's own
        return torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(shape)
    except NotImplementedError:
        raise UnsupportedModelError(f"GGUF tensor type {name} is not supported") from None

"""The KV cache tensors of every layer, shaped by the layer's KVSpec (models/arch/base.py).

Layers are grouped by how their slots are numbered:
- full attention (`window` None): the PagedAttention pool. Block ids from the block manager name the same
  token positions in every full layer; one extra block at the end is scratch (padded CUDA-graph rows).
- a sliding window W: a ring of R = W rounded up to whole blocks per sequence; token p of a sequence lives
  in slot ring * R + p % R. The ring is all such a layer ever needs, whatever the context length. Rings are
  handed out per sequence (`ring`) and come back when the sequence is forgotten; one extra ring is scratch.
  Prefix sharing is off for such models (a shared prefix would leave the rings empty).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spillover.models.arch.base import LayerSpec


@dataclass(frozen=True)
class KVGroup:
    """How the caches of the layers with one sliding window (or none) are addressed."""

    window: int | None
    ring: int  # slots per sequence (sliding); 0 for the block pool
    slots: int  # slots in each cache tensor of the group, scratch included
    scratch: int  # the slot padded rows write to and attend to


def ring_len(window: int, block_size: int) -> int:
    return -(-window // block_size) * block_size


class KVCaches:
    def __init__(
        self,
        specs: Sequence[LayerSpec],
        devices: Sequence[str],
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        rings: int = 0,
    ) -> None:
        self.specs, self.block_size, self.num_blocks = list(specs), block_size, num_blocks
        self.groups: dict[int | None, KVGroup] = {}
        for s in self.specs:
            w = s.kv.sliding_window
            if w in self.groups:
                continue
            if w is None:
                self.groups[w] = KVGroup(None, 0, (num_blocks + 1) * block_size, num_blocks * block_size)
            else:
                r = ring_len(w, block_size)
                self.groups[w] = KVGroup(w, r, (rings + 1) * r, rings * r)
        shapes = [(self.groups[s.kv.sliding_window].slots, s.kv.kv_heads, s.kv.head_dim) for s in self.specs]
        self.k = [_zeros(sh, dtype, d) for sh, d in zip(shapes, devices, strict=True)]
        self.v = [_zeros(sh, dtype, d) for sh, d in zip(shapes, devices, strict=True)]
        self.rings = rings
        self._free = list(range(rings - 1, -1, -1))
        self._ring_of: dict[int, int] = {}

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.groups)

    @property
    def max_context(self) -> int:
        """Tokens of context the block pool can address."""
        return self.num_blocks * self.block_size

    def ring(self, seq_id: int) -> int:
        """The ring of a sequence (handed out on first use)."""
        r = self._ring_of.get(seq_id)
        if r is None:
            if not self._free:
                raise RuntimeError(f"no free sliding-window ring for sequence {seq_id} ({self.rings} in all)")
            r = self._ring_of[seq_id] = self._free.pop()
        return r

    def release(self, seq_id: int) -> None:
        r = self._ring_of.pop(seq_id, None)
        if r is not None:
            self._free.append(r)


def ring_rings(pool_tokens: int, max_seq_len: int, max_batch_size: int, limit: int = 256) -> int:
    """How many sequences hold sliding-window rings at once: one per max_seq_len tokens of the pool (the
    pool's memory rule counts a ring per that many tokens), at least max_batch_size, at most `limit`."""
    return max(max_batch_size, min(limit, pool_tokens // max_seq_len))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """A zeroed cache tensor. In CPU memory from calloc (numpy's zeros): the kernel's zero pages, so a cache
    costs resident memory only for the slots that are written (torch.zeros would touch every page: 360 MiB
    for SmolLM2's default pool before the first token)."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or n == 0:  # (0: layers without a cache, e.g. cross-attention)
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(n, dtype=np.uint8)).view(dtype).view(shape)

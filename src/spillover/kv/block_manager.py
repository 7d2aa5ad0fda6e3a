"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts, per-sequence block tables.

Holds no tensors: the runner owns the cache tensors; this only decides which slots a sequence uses.
Blocks are shared between layers (every layer's cache has the same number of blocks and the same block
ids map to the same token positions).
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence with `table` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) so it holds `num_tokens` tokens."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            if not self.free:
                raise RuntimeError("KV cache out of blocks: check can_grow() first")
            b = self.free.popleft()
            self.ref[b] = 1
            table.append(b)

    def fork(self, table: list[int]) -> list[int]:
        """Share all blocks of `table` with a new sequence (copy-on-write is the caller's business)."""
        for b in table:
            self.ref[b] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        for b in table:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
        table.clear()

    def slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

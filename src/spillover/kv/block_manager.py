"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts, per-sequence block tables,
and prefix sharing of full blocks.

Holds no tensors: the runner owns the cache tensors; this only decides which slots a sequence uses.
Blocks are shared between layers (every layer's cache has the same number of blocks and the same block
ids map to the same token positions).

Prefix sharing: once every token of a full block has its K/V in the cache, the block is registered under
the hash of its whole prefix (a chain: h_i = hash((h_{i-1}, tokens of block i))) and the block's own
tokens, which are compared on lookup too. A new sequence whose prompt starts with registered blocks takes
them (refcount + 1) instead of recomputing them. A block whose refcount drops to 0 goes back to the free
list but keeps its contents and registration, so it can still be revived; it is only forgotten when the
free list hands it out again (oldest freed first, i.e. LRU eviction). Only full blocks are ever shared, and
a sequence never writes into a block it shares: its new tokens always land in blocks of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = 0


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """The key of a full block: its tokens and (through `parent`) every token before it."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of at least one token, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block id -> (chain hash, tokens)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (free ones that still hold a cached prefix included)."""
        return len(self.free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence with `table` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append fresh blocks to `table` (in place) so it holds `num_tokens` tokens."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            if not self.free:
                raise RuntimeError("KV cache out of blocks: check can_grow() first")
            b, _ = self.free.popitem(last=False)
            self._forget(b)
            self.ref[b] = 1
            table.append(b)

    def fork(self, table: list[int]) -> list[int]:
        """Share all blocks of `table` with a new sequence (copy-on-write is the caller's business)."""
        for b in table:
            self._take(b)
        return list(table)

    def release(self, table: list[int]) -> None:
        for b in table:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()

    def slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    # ---------------------------------------------------------------- prefix sharing

    def match_prefix(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """Registered blocks holding the first full blocks of `tokens` (at most `max_blocks`); no change."""
        if not self.prefix_caching:
            return []
        out: list[int] = []
        h, bs = ROOT_HASH, self.block_size
        for i in range(min(max_blocks, len(tokens) // bs)):
            block_tokens = tuple(tokens[i * bs : (i + 1) * bs])
            h = chain_hash(h, block_tokens)
            b = self.cached.get(h)
            if b is None or self.block_key[b][1] != block_tokens:
                break
            out.append(b)
        return out

    def revived(self, blocks: list[int]) -> int:
        """How many of `blocks` are free now (taking them uses up free blocks)."""
        return sum(1 for b in blocks if self.ref[b] == 0)

    def share(self, table: list[int], hashes: list[int], blocks: list[int]) -> None:
        """Start an empty `table` (and its chain `hashes`) with `blocks` from match_prefix()."""
        if table or hashes:
            raise RuntimeError("share() starts an empty block table")
        for b in blocks:
            self._take(b)
            hashes.append(self.block_key[b][0])
        table.extend(blocks)

    def register(self, table: list[int], tokens: Sequence[int], hashes: list[int], num_computed: int) -> None:
        """Register the full blocks of `table` whose K/V are all computed; `hashes` (the sequence's chain
        so far) is extended in place."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(hashes), min(num_computed // bs, len(table))):
            parent = hashes[-1] if hashes else ROOT_HASH
            block_tokens = tuple(tokens[i * bs : (i + 1) * bs])
            h = chain_hash(parent, block_tokens)
            hashes.append(h)
            b = table[i]
            if h not in self.cached and b not in self.block_key:
                self.cached[h] = b
                self.block_key[b] = (h, block_tokens)

    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def _forget(self, b: int) -> None:
        key = self.block_key.pop(b, None)
        if key is not None and self.cached.get(key[0]) == b:
            del self.cached[key[0]]

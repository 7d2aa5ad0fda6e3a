"""Block manager (free list, refcounts, prefix sharing) and KV pool sizing, without tensors."""

from __future__ import annotations

import pytest

from spillover.errors import ConfigError
from spillover.kv.block_manager import BlockManager
from spillover.kv.pool import DeviceMemory, PoolSettings, kv_pool_blocks, kv_pool_tokens

GiB = 1 << 30


def test_grow_release_and_refcounts():
    bm = BlockManager(8, 4)
    t: list[int] = []
    bm.grow(t, 9)  # 3 blocks
    assert len(t) == 3 and bm.num_free == 5
    assert bm.blocks_needed(t, 12) == 0 and bm.blocks_needed(t, 13) == 1
    other = bm.fork(t)
    bm.release(t)
    assert t == [] and bm.num_free == 5  # still held by the fork
    bm.release(other)
    assert bm.num_free == 8
    assert bm.slot([5, 2], 6) == 2 * 4 + 2
    with pytest.raises(RuntimeError):
        bm.grow([], 33)


def _run_prefill(bm: BlockManager, tokens: list[int]) -> tuple[list[int], list[int]]:
    table: list[int] = []
    hashes: list[int] = []
    bm.grow(table, len(tokens))
    bm.register(table, tokens, hashes, len(tokens))
    return table, hashes


def test_prefix_match_share_and_revive():
    bm = BlockManager(8, 4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    table, hashes = _run_prefill(bm, prompt)
    assert len(hashes) == 2  # only full blocks are registered
    # a prompt with the same first 8 tokens shares both blocks; a different second block shares one
    assert bm.match_prefix(prompt[:8] + [99, 98], 2) == table[:2]
    assert bm.match_prefix(prompt[:4] + [7, 7, 7, 7, 1], 2) == table[:1]
    assert bm.match_prefix([5] + prompt[1:], 2) == []
    assert bm.match_prefix(prompt, 1) == table[:1]  # capped (the last prompt token is always recomputed)
    t2, h2 = [], []
    bm.share(t2, h2, bm.match_prefix(prompt, 2))
    assert h2 == hashes and [bm.ref[b] for b in t2] == [2, 2]
    bm.release(table)
    bm.release(t2)
    assert bm.num_free == 8
    # freed blocks keep their contents: still matched, and taking them uses up free blocks
    hit = bm.match_prefix(prompt, 2)
    assert len(hit) == 2 and bm.revived(hit) == 2
    t3, h3 = [], []
    bm.share(t3, h3, hit)
    assert bm.num_free == 6


def test_lru_eviction_forgets_blocks():
    bm = BlockManager(4, 2)
    a, _ = _run_prefill(bm, [1, 2, 3, 4])
    bm.release(a)
    b, _ = _run_prefill(bm, [5, 6, 7, 8])  # takes the 2 never-used blocks first
    bm.release(b)
    assert len(bm.match_prefix([1, 2, 3, 4, 0], 2)) == 2
    c: list[int] = []
    bm.grow(c, 4)  # evicts a's blocks (freed first)
    assert bm.match_prefix([1, 2, 3, 4, 0], 2) == []
    assert len(bm.match_prefix([5, 6, 7, 8, 0], 2)) == 2


def test_no_prefix_caching():
    bm = BlockManager(8, 4, prefix_caching=False)
    table, hashes = _run_prefill(bm, list(range(8)))
    assert hashes == [] and bm.match_prefix(list(range(9)), 2) == []


# ---------------------------------------------------------------------------- pool sizing


def _gpu(total=80 * GiB, free=60 * GiB, reserved=4 * GiB, per_token=128 << 10):
    return DeviceMemory("cuda:0", "cuda", total, free, reserved, per_token)


def _cpu(free=64 * GiB, per_token=128 << 10):
    return DeviceMemory("cpu", "cpu", 128 * GiB, free, 0, per_token)


KW = dict(max_seq_len=4096, max_batch_size=2, max_model_len=32768)


def test_pool_cuda_fraction_like_vllm():
    # 0.9 * 80 GiB - 20 GiB in use - 4 GiB reserve = 48 GiB of KV at 128 KiB/token
    assert kv_pool_tokens([_gpu()], **KW) == (48 * GiB) // (128 << 10)
    half = kv_pool_tokens([_gpu()], **KW, settings=PoolSettings(memory_fraction=0.5))
    assert half == (16 * GiB) // (128 << 10)


def test_pool_never_below_the_planner_reservation():
    tight = _gpu(free=3 * GiB, total=24 * GiB)  # fraction leaves nothing
    assert kv_pool_tokens([tight], **KW) == 2 * 4096
    assert kv_pool_tokens([_gpu()], **KW, settings=PoolSettings(context_len=100)) == 2 * 4096
    assert kv_pool_tokens([_gpu()], **KW, settings=PoolSettings(context_len=50_000)) == 50_000
    assert kv_pool_tokens([_gpu()], **KW, settings=PoolSettings(paged=False)) == 2 * 4096
    assert kv_pool_tokens([], max_seq_len=100, max_batch_size=3, max_model_len=8192,
                          settings=PoolSettings(paged=False)) == 3 * 100  # fmt: skip


def test_pool_cpu_default_and_cap():
    assert kv_pool_tokens([_cpu()], **KW) == 32768  # one sequence of the model's whole context
    small = dict(KW, max_model_len=2048)
    assert kv_pool_tokens([_cpu()], **small) == 2 * 4096  # the reservation when it is larger
    capped = kv_pool_tokens([_cpu(free=1 * GiB)], **KW)  # 0.2 x 1 GiB = 1638 tokens < reservation
    assert capped == 2 * 4096
    mixed = kv_pool_tokens([_gpu(), _cpu(free=8 * GiB)], **KW)  # the CPU share bounds a spilled model
    assert mixed == int(8 * GiB * 0.2) // (128 << 10)
    assert kv_pool_blocks(17, 16) == 2


def test_pool_settings_validate():
    with pytest.raises(ConfigError):
        PoolSettings(memory_fraction=1.5)
    with pytest.raises(ConfigError):
        PoolSettings(context_len=0)

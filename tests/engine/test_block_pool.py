"""BlockPool and KVCacheManager: reference counts, prefix hits, LRU eviction, all-or-nothing allocation."""

from __future__ import annotations

import pytest

from opengpt.engine.block_pool import BlockPool, KVCacheManager, NoFreeBlocks, block_hashes, hash_block

BS = 4


def manager(num_blocks: int = 8, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks, enable_prefix_caching=caching), BS)


def run(m: KVCacheManager, rid: str, tokens: list[int]) -> list[int]:
    """What a scheduler does for a whole prompt: prefix lookup, allocate, compute, register."""
    prefix = m.computed_prefix(tokens)
    assert m.allocate(rid, len(tokens), prefix)
    m.register_full_blocks(rid, tokens, len(tokens))
    return m.block_table(rid)


def test_hashes_chain_on_the_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert len(a) == 2  # only full blocks
    b = block_hashes([9, 9, 9, 9, 5, 6, 7, 8], BS)
    assert a[1] != b[1]  # same tokens in block 2, different prefix
    assert a[0] == hash_block(None, [1, 2, 3, 4])


def test_refcounts_return_to_zero_and_no_block_leaks():
    m = manager()
    run(m, "a", list(range(10)))  # 3 blocks
    run(m, "b", list(range(100, 106)))  # 2 blocks
    assert m.pool.num_free == 3
    m.free("a")
    m.free("b")
    assert m.pool.num_free == 8
    assert all(b.ref_count == 0 for b in m.pool.blocks)


def test_prefix_hit_shares_blocks():
    m = manager()
    system = list(range(8))  # two full blocks
    ta = run(m, "a", system + [50, 51, 52])
    prefix = m.computed_prefix(system + [60, 61])
    assert [b.id for b in prefix] == ta[:2]
    tb = run(m, "b", system + [60, 61])
    assert tb[:2] == ta[:2] and tb[2] != ta[2]
    assert [m.pool.blocks[i].ref_count for i in ta[:2]] == [2, 2]
    m.free("a")
    m.free("b")
    assert all(b.ref_count == 0 for b in m.pool.blocks)


def test_hit_survives_free_until_evicted():
    m = manager(num_blocks=4)
    first = run(m, "a", list(range(8)) + [99])  # 3 blocks, 2 full ones registered
    m.free("a")
    assert [b.id for b in m.computed_prefix(list(range(8)) + [7])] == first[:2]  # still cached
    run(m, "b", list(range(200, 216)))  # needs all 4 blocks: evicts the cached ones
    m.free("b")
    assert m.computed_prefix(list(range(8)) + [7]) == []


def test_lru_evicts_tail_blocks_first():
    m = manager(num_blocks=4)
    run(m, "a", list(range(8)) + [99])  # blocks for [0..3], [4..7], [99]
    m.free("a")  # released in reverse: the head block is the last to be evicted
    run(m, "b", [500, 501, 502])  # takes one block from the front of the free queue
    assert len(m.computed_prefix(list(range(8)) + [1])) == 2  # both full prefix blocks survive
    run(m, "c", [600, 601, 602, 603, 604])  # two more blocks: evicts [4..7] before [0..3]
    assert len(m.computed_prefix(list(range(8)) + [1])) == 1


def test_never_the_whole_prompt_from_cache():
    m = manager()
    run(m, "a", list(range(8)))
    assert len(m.computed_prefix(list(range(8)))) == 1  # the last token must be computed


def test_allocation_is_all_or_nothing():
    m = manager(num_blocks=3)
    assert m.allocate("a", 8)  # 2 blocks
    assert not m.allocate("b", 8)  # needs 2, 1 free
    assert "b" not in m.requests and m.pool.num_free == 1
    assert m.allocate("a", 12)  # grows into the last block
    assert not m.allocate("a", 13)
    with pytest.raises(NoFreeBlocks):
        m.pool.allocate(1)


def test_free_queue_hit_counts_against_capacity():
    m = manager(num_blocks=3)
    run(m, "a", list(range(8)) + [1])  # 3 blocks
    m.free("a")
    prefix = m.computed_prefix(list(range(8)) + [5, 6, 7, 8, 9])
    assert len(prefix) == 2
    # 13 tokens = 4 blocks > 3: refused, and the hit blocks stay free and cached
    assert not m.allocate("b", 13, prefix)
    assert m.pool.num_free == 3 and all(b.ref_count == 0 for b in m.pool.blocks)


def test_slots_follow_the_block_table():
    m = manager()
    m.allocate("a", 6)
    table = m.block_table("a")
    assert m.slots("a", [0, 3, 4, 5]) == [table[0] * BS, table[0] * BS + 3, table[1] * BS, table[1] * BS + 1]


def test_prefix_caching_off():
    m = manager(caching=False)
    run(m, "a", list(range(9)))
    assert m.computed_prefix(list(range(9))) == []


def test_double_release_is_an_error():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks)

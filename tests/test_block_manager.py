"""Block manager: plain Python, no model, no torch."""

import pytest

from llamaserve.engine.block_manager import BlockManager, OutOfBlocks, block_hashes


def test_allocation_gives_distinct_blocks_lowest_first_and_counts_them():
    bm = BlockManager(num_blocks=8, block_size=16, first_id=1)
    a = bm.allocate(3)
    b = bm.allocate(2)
    assert a == [1, 2, 3] and b == [4, 5]
    assert bm.num_free == 3 and bm.num_used == 5 and bm.usage() == 5 / 8
    assert all(bm.ref_count(x) == 1 for x in a + b)
    assert bm.blocks_for(1) == 1 and bm.blocks_for(16) == 1 and bm.blocks_for(17) == 2


def test_freeing_returns_blocks_and_they_are_reused():
    bm = BlockManager(num_blocks=4, block_size=16)
    a = bm.allocate(4)
    assert bm.num_free == 0
    bm.free(a[:2])
    assert bm.num_free == 2 and bm.ref_count(a[0]) == 0
    assert sorted(bm.allocate(2)) == sorted(a[:2])
    with pytest.raises(ValueError, match="nobody holds it"):
        bm.free([a[2], a[2]])  # a double free is a bug, not a silent no-op


def test_exhaustion_raises_and_takes_nothing():
    bm = BlockManager(num_blocks=3, block_size=16)
    bm.allocate(2)
    assert not bm.can_allocate(2) and bm.can_allocate(1)
    with pytest.raises(OutOfBlocks, match="2 blocks asked for, 1 free of 3"):
        bm.allocate(2)
    assert bm.num_free == 1  # the failed allocation took nothing


def test_shared_blocks_are_freed_when_the_last_holder_lets_go():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(2)
    hashes = block_hashes(list(range(8)), 4)
    for block, h in zip(a, hashes):
        bm.register(block, h)
    assert bm.lookup(hashes) == a
    bm.take(a)  # a second sequence shares the prefix
    assert [bm.ref_count(x) for x in a] == [2, 2]
    bm.free(a)
    assert bm.num_free == 2 and [bm.ref_count(x) for x in a] == [1, 1]
    bm.free(a)
    assert bm.num_free == 4 and bm.lookup(hashes) == a  # free, but still cached


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = bm.allocate(2), bm.allocate(2)
    h_old = block_hashes([1, 2, 3, 4], 2, salt=b"m")
    h_new = block_hashes([5, 6, 7, 8], 2, salt=b"m")
    for blocks, hashes in ((old, h_old), (new, h_new)):
        for block, h in zip(blocks, hashes):
            bm.register(block, h)
    bm.free(old)
    bm.free(new)
    assert bm.num_free == 4 and bm.num_cached == 4
    # Within a sequence the tail goes first, so the head of the old prefix outlives its tail.
    got = bm.allocate(1)
    assert got == [old[1]]
    assert bm.lookup(h_old) == [old[0]] and bm.lookup(h_new) == new
    bm.allocate(1)
    assert bm.lookup(h_old) == [] and bm.lookup(h_new) == new
    # Taking a cached free block back protects it from eviction.
    bm.take(bm.lookup(h_new))
    assert bm.num_free == 0 and not bm.can_allocate(1)


def test_hashes_chain_over_everything_before_and_the_salt():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # full blocks only
    b = block_hashes([9, 2, 3, 4, 5, 6], 2)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert block_hashes([1, 2, 3, 4], 2) == a[:2]
    assert block_hashes([1, 2, 3, 4], 2, salt=b"bf16") != a[:2]
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, n_blocks=1) == a[:1]
    assert block_hashes([1 << 40, 2], 2) != block_hashes([0, 2], 2)


def test_lookup_stops_at_the_first_miss_and_a_duplicate_prefix_keeps_its_first_block():
    bm = BlockManager(num_blocks=6, block_size=2)
    hashes = block_hashes([1, 2, 3, 4, 5, 6], 2)
    first = bm.allocate(3)
    bm.register(first[0], hashes[0])
    bm.register(first[2], hashes[2])
    assert bm.lookup(hashes) == [first[0]]
    other = bm.allocate(1)
    bm.register(other[0], hashes[0])
    assert bm.lookup(hashes[:1]) == [first[0]]
    bm.free(other)
    assert bm.num_cached == 2 and bm.num_free == 3  # the duplicate was never cached
    bm.reset_prefix_cache()
    assert bm.lookup(hashes) == [] and bm.num_cached == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(bad, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, bad)

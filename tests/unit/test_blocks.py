"""The KV block manager (model/blocks.py): allocation, sharing, copy-on-write, the hash-keyed LRU."""

import pytest

from model.blocks import BlockManager


def test_allocate_append_and_release_count_every_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    table = bm.allocate(bm.blocks_for(5))
    assert len(table) == 2 and bm.num_used == 2 and bm.num_free == 4
    assert bm.may_append(table, 5, 8) and bm.append(table, 5, 8) == [] and len(table) == 2  # same block
    assert bm.append(table, 8, 9) == [] and len(table) == 3
    assert not bm.can_allocate(4) and bm.can_allocate(3)
    with pytest.raises(MemoryError):
        bm.allocate(4)
    bm.release(table)
    assert bm.num_used == 0 and bm.num_free == 6


def test_fork_shares_blocks_and_the_partial_last_block_is_copied_on_write():
    bm = BlockManager(8, 4)
    a = bm.allocate(2)  # positions 0..5: block a[1] is partial
    b = bm.fork(a)
    assert b == a and bm.num_used == 2 and all(bm.refs[x] == 2 for x in a)
    assert bm.blocks_to_append(a, 6, 7) == 1  # the shared partial block must be copied first
    copies = bm.append(a, 6, 7)
    assert copies == [(b[1], a[1])] and a[0] == b[0] and a[1] != b[1]
    assert bm.refs[b[1]] == 1 and bm.refs[a[1]] == 1 and bm.refs[a[0]] == 2
    assert bm.append(b, 6, 7) == []  # the other holder owns its block alone now: written in place
    bm.release(a)
    bm.release(b)
    assert bm.num_used == 0


def test_registered_blocks_stay_cached_until_evicted_lru_first_and_are_matched_by_hash():
    bm = BlockManager(4, 2)
    a = bm.allocate(3)
    for blk, h in zip(a, ["h0", "h1", "h2"]):
        bm.register(blk, h)
    bm.release(a)
    assert bm.num_cached == 3 and bm.num_free == 1 and bm.num_used == 0
    assert bm.match(["h0", "h1", "hx", "h2"]) == a[:2] and bm.count_cached(["h0", "h1", "h2"]) == 3
    shared = bm.take(bm.match(["h0"]))
    assert bm.num_cached == 2 and bm.refs[shared[0]] == 1
    fresh = bm.allocate(2)  # the free block, then the least recently used cached one: the deepest
    assert a[2] in fresh and bm.match(["h0", "h1", "h2"]) == a[:2]
    bm.allocate(1)
    assert bm.match(["h0", "h1"]) == a[:1] and bm.num_cached == 0
    assert not bm.can_allocate(1)


def test_writing_into_a_registered_block_copies_it():
    bm = BlockManager(4, 2)
    t = bm.allocate(1)
    bm.register(t[0], "h")
    old = t[0]
    assert bm.append(t, 1, 2) == [(old, t[0])] and t[0] != old
    assert bm.hash_of[t[0]] is None and bm.num_cached == 1  # the named block is kept, unreferenced


def test_a_hash_already_held_keeps_its_block():
    bm = BlockManager(4, 2)
    a, b = bm.allocate(1), bm.allocate(1)
    bm.register(a[0], "h")
    bm.register(b[0], "h")
    assert bm.by_hash["h"] == a[0] and bm.hash_of[b[0]] is None
    bm.release(b)
    assert bm.num_free == 3  # an unnamed block is free at once

"""The pool of read buffers: a buffer is handed out again only when no view of it is left."""

from __future__ import annotations

import torch

from cache.codec import decode, encode
from hugepages import BufferPool
from tests.integration.test_store_contract import record


def test_a_buffer_is_reused_only_when_nothing_refers_to_it():
    pool = BufferPool(limit_bytes=8 << 20, granule=1 << 20)
    a = pool.take(1000)
    a[:3] = b"abc"
    b = pool.take(1000)
    assert b.obj is not a.obj  # a is in use
    t = torch.frombuffer(a, dtype=torch.uint8)[:3].view(torch.int8)  # a tensor viewing a's buffer
    del a
    c = pool.take(1000)
    assert c.obj is not t.numpy().base and len(pool._arrays) == 3  # the tensor still holds it
    del b
    d = pool.take(500)
    assert d.obj is pool._arrays[1]  # b's buffer, nothing refers to it any more
    del t
    e = pool.take(1000)
    assert e.obj is pool._arrays[0] and bytes(e[:3]) == b"abc"


def test_the_pool_keeps_to_its_limit_and_gives_unpooled_buffers_beyond_it():
    pool = BufferPool(limit_bytes=8 << 20, granule=1 << 20)
    small = [pool.take(1 << 20) for _ in range(3)]
    big = pool.take(20 << 20)  # larger than the whole pool
    assert len(big) == 20 << 20 and pool.nbytes == 3 << 20
    del small[0], small[0]
    mid = pool.take(6 << 20)  # room made by dropping a buffer nobody uses (only as many as needed)
    assert len(mid) == 6 << 20 and pool.nbytes == 8 << 20 and len(pool._arrays) == 3  # one went


def test_a_record_decoded_from_a_pooled_buffer_stays_intact_while_it_is_alive():
    pool = BufferPool(limit_bytes=64 << 20, granule=1 << 20)
    rec = record(50, fill=3.0)
    data = encode(rec)
    buf = pool.take(len(data))
    buf[:] = data
    loaded = decode(buf)
    del buf
    other = pool.take(len(data))  # must not be the buffer the record's tensors view
    other[:] = b"\xff" * len(data)
    assert torch.equal(loaded.keys[1], rec.keys[1]) and torch.equal(loaded.values[0], rec.values[0])
    del loaded, other
    again = pool.take(len(data))  # both free now: reused, not grown
    assert len(pool._arrays) == 2 and any(again.obj is a for a in pool._arrays)


def test_prefaulted_buffers_are_handed_out_without_growing_the_pool():
    pool = BufferPool(limit_bytes=8 << 20, granule=1 << 20)
    assert pool.prefault(1500 << 10, 3) == 3 and len(pool._arrays) == 3  # 1.5 MiB -> 2 MiB each
    assert pool.prefault(1500 << 10, 3) == 3 and len(pool._arrays) == 3  # already there
    held = [pool.take(1400 << 10) for _ in range(3)]
    assert len(pool._arrays) == 3 and {id(h.obj) for h in held} == {id(a) for a in pool._arrays}
    assert pool.prefault(1 << 20, 10) == 5  # 3 fit already; the 8 MiB limit stops it at 2 more
    assert pool.nbytes == 8 << 20


def test_small_buffers_are_not_rounded_to_a_whole_granule():
    pool = BufferPool(limit_bytes=8 << 20, granule=2 << 20)
    assert len(pool.take(100 << 10)) == 100 << 10 and pool.nbytes == 128 << 10

"""One contract, every backend: the same assertions run on diskcache and on a real Redis."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
import torch

from cache.base import Backend, BackendUnavailable
from cache import keys
from cache.codec import KVRecord, encode
from cache.entries import CacheStatus
from cache.store import KVStore

FP = "fingerprint-test"


def record(num_tokens: int, fill: float = 1.0, fingerprint: str = FP, layers: int = 2) -> KVRecord:
    n = num_tokens - 1
    keys = [torch.full((2, n, 8), fill + i, dtype=torch.float32) for i in range(layers)]
    values = [torch.full((2, n, 8), -fill - i, dtype=torch.float32) for i in range(layers)]
    return KVRecord(list(range(num_tokens)), 3, fingerprint, keys, values)


@pytest.fixture(params=["disk", "redis"])
def make_backend(request, tmp_path):
    """A factory of fresh backends (own directory / own Redis namespace) of one kind."""
    made: list[Backend] = []
    ns = f"kvtest-{uuid.uuid4().hex[:8]}"

    def make(max_bytes: int = 0) -> Backend:
        if request.param == "disk":
            from cache.disk import DiskBackend

            b = DiskBackend(str(tmp_path / f"c{len(made)}"), max_bytes=max_bytes)
        else:
            from cache.redis import RedisBackend

            url = request.getfixturevalue("redis_url")
            b = RedisBackend(url, max_bytes=max_bytes, timeout=2.0, namespace=f"{ns}-{len(made)}")
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def key() -> str:
    return f"kvtest:{uuid.uuid4().hex}"


def test_get_set_delete(make_backend, key):
    b = make_backend()
    assert b.get(key) is None
    b.set(key, bytearray(b"abc" * 1000))
    assert b.get(key) == b"abc" * 1000
    b.set(key, memoryview(b"second"))  # overwrite replaces the whole value
    assert b.get(key) == b"second"
    assert b.delete(key) is True
    assert b.get(key) is None
    assert b.delete(key) is False


def test_info_reports_size_and_head_without_counting_as_use(make_backend, key):
    b = make_backend()
    assert b.info(key) is None
    data = encode(record(20))
    b.set(key, data, ttl=60)
    info = b.info(key)
    assert info is not None and info.nbytes == len(data)
    assert info.head is not None and bytes(data).startswith(info.head) and len(info.head) > 64
    assert info.expires_at is not None and time.time() + 50 < info.expires_at < time.time() + 61
    assert info.last_used_at is not None


def test_ttl_expiry(make_backend, key):
    b = make_backend()
    b.set(key, b"short-lived", ttl=0.3)
    b.set(key + "-forever", b"stays")
    assert b.get(key) == b"short-lived"
    time.sleep(0.6)
    assert b.get(key) is None
    assert b.info(key) is None
    assert b.get(key + "-forever") == b"stays"


def test_lease_acquire_release(make_backend, key):
    b = make_backend()
    lease = "lease:" + key
    assert b.acquire(lease, "t1", 30) is True
    assert b.acquire(lease, "t2", 30) is False
    b.release(lease, "t2")  # not the holder: no effect
    assert b.acquire(lease, "t2", 30) is False
    b.release(lease, "t1")
    assert b.acquire(lease, "t2", 30) is True
    b.release(lease, "t2")


def test_lease_lapses(make_backend, key):
    b = make_backend()
    lease = "lease:" + key
    assert b.acquire(lease, "t1", 0.3) is True
    time.sleep(0.6)
    assert b.acquire(lease, "t2", 30) is True


def test_byte_budget_evicts_least_recently_used_whole_records(make_backend, key):
    value = bytes(range(256)) * 400  # 100 KiB
    b = make_backend(max_bytes=int(len(value) * 3.5))
    lease = "lease:" + key
    assert b.acquire(lease, "holder", 60)
    keys = [f"{key}:{i}" for i in range(3)]
    for k in keys:
        b.set(k, value)
    assert b.get(keys[0]) == value  # key 0 is now more recently used than key 1
    b.set(f"{key}:3", value)
    b.set(f"{key}:4", value)  # over budget twice: the two least recently used go (1, then 2)
    assert b.get(keys[1]) is None and b.get(keys[2]) is None
    for k in (keys[0], f"{key}:3", f"{key}:4"):
        assert b.get(k) == value  # survivors are whole, never cut
    assert b.total_bytes() <= int(len(value) * 3.5)
    assert b.acquire(lease, "other", 60) is False  # a lease is never evicted as a record


def test_budget_accounting_survives_overwrite_delete_and_expiry(make_backend, key):
    value = b"x" * 50_000
    b = make_backend(max_bytes=10 * len(value))
    b.set(key + ":a", value)
    b.set(key + ":a", value)  # overwrite counts once
    b.set(key + ":b", value, ttl=0.2)
    b.set(key + ":c", value)
    b.delete(key + ":c")
    time.sleep(0.4)
    b.set(key + ":d", b"y" * 10)  # a write settles expired entries
    assert b.total_bytes() == len(value) + 10


def test_unreachable_redis_is_unavailable(key):
    from cache.redis import RedisBackend
    from launcher import free_port

    b = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(BackendUnavailable):
        b.get(key)
    with pytest.raises(BackendUnavailable):
        b.set(key, b"v")


def test_redis_large_reads_honour_password_and_database_and_survive_a_restart(redis_server_factory, key):
    """Values are read on the backend's own connections (straight into one buffer): they must log in,
    select the URL's database, and reconnect after Redis restarts, like redis-py's do."""
    import redis

    from cache.redis import RedisBackend

    server = redis_server_factory(password="s3cret")
    b = RedisBackend(f"redis://:s3cret@127.0.0.1:{server.port}/3", timeout=2.0)
    try:
        big = os.urandom((3 << 20) + 7)  # many socket reads, an odd length
        b.set(key, big)
        assert bytes(b.get(key)) == big and b.get(key + ":missing") is None
        b._bulk.chunk_bytes = 64 << 10  # many ranges, two in flight, a short last one
        assert bytes(b.get(key)) == big
        b._bulk.chunk_bytes = len(big)  # exactly one range
        assert bytes(b.get(key)) == big
        db0 = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret")
        db3 = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
        assert db0.get(key) is None and db3.get(key) == big
        db3.delete(key)
        db3.rpush(key, "x")  # a reply of the wrong type is an error, and the connection stays usable
        with pytest.raises(BackendUnavailable):
            b.get(key)
        db3.delete(key)
        b.set(key, b"after")
        assert bytes(b.get(key)) == b"after"
        server.kill()
        with pytest.raises(BackendUnavailable):
            b.get(key)
        redis_server_factory(server.port, password="s3cret")  # the same port, empty (no persistence)
        assert b.get(key) is None  # stale connections are replaced
        b.set(key, b"again")
        assert bytes(b.get(key)) == b"again"
    finally:
        b.close()
    wrong = RedisBackend(f"redis://:nope@127.0.0.1:{server.port}/0", timeout=2.0)
    with pytest.raises(BackendUnavailable):
        wrong.get(key)
    wrong.close()


def test_redis_over_a_unix_socket_reads_through_redis_py(redis_server_factory, tmp_path, key):
    from cache.redis import RedisBackend

    path = tmp_path / "redis.sock"
    redis_server_factory(unixsocket=str(path))
    b = RedisBackend(f"unix://{path}?db=2", timeout=2.0)
    try:
        assert b._bulk is None
        big = os.urandom(1 << 20)
        b.set(key, big)
        assert bytes(b.get(key)) == big and b.get(key + ":missing") is None
    finally:
        b.close()


def test_lease_renew_and_exists(make_backend, key):
    b = make_backend()
    assert b.acquire(key, "t1", 0.3)
    assert not b.renew(key, "someone-else", 5.0)
    assert b.renew(key, "t1", 5.0)
    time.sleep(0.5)  # past the first ttl: renewed, so still held
    assert not b.acquire(key, "t2", 5.0)
    b.release(key, "t1")
    assert b.acquire(key, "t3", 0.2)
    time.sleep(0.4)  # never renewed: lapses by itself
    assert b.acquire(key, "t4", 5.0)
    b.set(key + ":v", b"x")
    assert b.exists([key + ":v", key + ":none"]) == [True, False]


# -- through the store: blocks and heads, codec, fingerprints, tenants ----------------------------
BLOCK = 8


def kv(n: int, fill: float = 1.0, layers: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer [2 heads, n, 8]; position p holds fill + p so slices are checkable."""
    pos = torch.arange(n, dtype=torch.float32).view(1, n, 1)
    keys = [(pos + fill + 100 * i).expand(2, n, 8).contiguous() for i in range(layers)]
    values = [-(pos + fill + 100 * i).expand(2, n, 8).contiguous() for i in range(layers)]
    return keys, values


@pytest.fixture
def store(make_backend):
    s = KVStore(make_backend(), FP, block_tokens=BLOCK, timeout=5)
    yield s
    s._pool.shutdown(wait=True)


def run(coro):
    return asyncio.run(coro)


def save(store, tenant, rid, tokens, fill=1.0, **kw):
    return run(store.save(tenant, tokens, 3, kv(len(tokens) - 1, fill), 0, known_blocks=[], request_id=rid, **kw))


def test_store_round_trip_blocks_head_and_info(store):
    rid, t = uuid.uuid4().hex, uuid.uuid4().hex  # a fresh tenant: blocks of earlier runs are not found
    tokens = list(range(30))  # 29 KV positions: 3 blocks of 8 and a tail of 5
    assert run(store.load_head(t, rid)).status is CacheStatus.MISS
    saved = save(store, t, rid, tokens, fill=0.5)
    assert saved.ok and saved.num_blocks == 3
    got = run(store.load_head(t, rid))
    assert got.status is CacheStatus.HIT and got.head.token_ids == tokens and len(got.head.blocks) == 3
    keys, _ = kv(29, 0.5)
    assert torch.equal(got.head.tail_keys[1], keys[1][:, 24:])
    store._memory.clear()  # read the blocks from the backend, not this process's memory
    blocks, nbytes, local = run(store.read_blocks(t, got.head.blocks, tokens))
    assert len(blocks) == 3 and nbytes > 0 and local == 0
    assert torch.equal(torch.cat([b.keys[0] for b in blocks], dim=1), keys[0][:, :24])
    info = run(store.info(t, rid))
    assert info.num_tokens == 30 and info.num_prompt_tokens == 3 and info.fingerprint == FP
    assert info.num_blocks == 3 and info.nbytes >= got.nbytes + 3 * BLOCK * 2 * 2 * 2 * 8 * 4
    assert run(store.delete(t, rid)) is True
    assert run(store.info(t, rid)) is None
    assert run(store.load_head(t, rid)).status is CacheStatus.MISS


def test_store_atomic_overwrite_of_a_head(store):
    rid = uuid.uuid4().hex
    save(store, "t", rid, list(range(10)), fill=1.0)
    save(store, "t", rid, list(range(40)), fill=2.0)
    got = run(store.load_head("t", rid))
    assert got.status is CacheStatus.HIT and len(got.head.token_ids) == 40 and len(got.head.blocks) == 4


def test_store_a_shared_prefix_is_written_once(store):
    prefix = list(range(1000, 1024))  # three full blocks
    t = uuid.uuid4().hex
    first = save(store, t, uuid.uuid4().hex, prefix + [1, 2, 3])
    second = save(store, t, uuid.uuid4().hex, prefix + [7, 8, 9])
    assert first.num_blocks == 3 and second.num_blocks == 0
    assert second.nbytes < first.nbytes / 2  # only the head
    other = KVStore(store.backend, FP, block_tokens=BLOCK, timeout=5)  # another replica, cold memory
    hashes = other.hashes(t, prefix + [5], 3)
    assert run(other.count_blocks(t, hashes)) == 3
    other._pool.shutdown(wait=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "old-format"])
def test_store_damaged_head_is_a_miss(store, damage):
    rid = uuid.uuid4().hex
    save(store, "t", rid, list(range(25)))
    data = bytearray(store.backend.get(keys.head_key("t", rid)))
    if damage == "truncate":  # as if the writer died mid-write
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "old-format":  # a record of the one-value-per-request_id format
        data[4:6] = (2).to_bytes(2, "little")
    else:
        data = bytearray()
    store.backend.set(keys.head_key("t", rid), bytes(data) or b"\0")
    assert run(store.load_head("t", rid)).status is CacheStatus.MISS


def test_store_damaged_block_ends_the_restorable_prefix(store):
    tokens, t = list(range(40)), uuid.uuid4().hex
    save(store, t, "r", tokens)
    head = run(store.load_head(t, "r")).head
    store._memory.clear()
    store.backend.set(keys.block_key(t, head.blocks[2]), b"garbage")
    blocks, _, _ = run(store.read_blocks(t, head.blocks, tokens))
    assert len(blocks) == 2
    blocks, _, _ = run(store.read_blocks(t, head.blocks, [9] * 40))  # tokens that do not match
    assert blocks == []


def test_store_foreign_fingerprint_is_a_miss(make_backend):
    backend = make_backend()
    other = KVStore(backend, "another-model", block_tokens=BLOCK, timeout=5)
    rid = uuid.uuid4().hex
    save(other, "t", rid, list(range(20)))
    mine = KVStore(backend, FP, block_tokens=BLOCK, timeout=5)
    assert run(mine.load_head("t", rid)).status is CacheStatus.MISS
    for s in (other, mine):
        s._pool.shutdown(wait=True)


def test_store_tenants_are_isolated(store):
    rid = uuid.uuid4().hex
    tokens = list(range(15))
    save(store, "tenant-a", rid, tokens)
    store.backend.delete(keys.block_key("tenant-b", store.hashes("tenant-b", tokens, 1)[0]))
    assert run(store.load_head("tenant-b", rid)).status is CacheStatus.MISS
    assert run(store.info("tenant-b", rid)) is None
    assert run(store.delete("tenant-b", rid)) is False
    store._memory.clear()
    assert run(store.count_blocks("tenant-b", store.hashes("tenant-b", tokens, 1))) == 0
    assert run(store.load_head("tenant-a", rid)).status is CacheStatus.HIT


def test_store_leases_are_per_tenant_and_request_id(store):
    rid = uuid.uuid4().hex
    assert run(store.acquire("a", rid, "x"))
    assert not run(store.acquire("a", rid, "y"))
    assert run(store.acquire("b", rid, "z"))
    run(store.release("a", rid, "x"))
    run(store.release("b", rid, "z"))
    assert run(store.acquire("a", rid, "w"))
    run(store.release("a", rid, "w"))


def test_store_memory_of_written_blocks_is_bounded(make_backend):
    one_block = 2 * 2 * 2 * BLOCK * 8 * 4
    s = KVStore(make_backend(), FP, block_tokens=BLOCK, timeout=5, memory_bytes=2 * one_block)
    save(s, "t", "r", list(range(50)))
    assert 0 < s._memory_nbytes <= 2 * one_block
    s._pool.shutdown(wait=True)


# -- background jobs: a fenced, expiring event list; registry, lease and cancel mark -------------
def test_event_list_append_is_fenced_by_length_and_reads_from_any_index(make_backend, key):
    b = make_backend()
    assert b.log_read(key, 0, 10) == []
    assert b.log_append(key, 0, [b"e0", b"e1"], 60) == 2
    assert b.log_append(key, 1, [b"late"], 60) == -3  # a writer that lost its place: refused
    assert b.log_append(key, 2, [b"e2"], 60) == 3
    assert [bytes(v) for v in b.log_read(key, 0, 10)] == [b"e0", b"e1", b"e2"]
    assert [bytes(v) for v in b.log_read(key, 1, 1)] == [b"e1"]
    assert b.log_read(key, 3, 10) == []
    b.log_delete(key)
    assert b.log_read(key, 0, 10) == [] and b.log_append(key, 0, [b"again"], 60) == 1


def test_event_lists_appended_in_one_call_are_each_fenced(make_backend):
    """One call for many lists (a runner's tick): each list is fenced on its own length, results in order."""
    b = make_backend()
    k1, k2, k3 = (f"kvtest:{{{uuid.uuid4().hex}}}:events" for _ in range(3))  # three slots on a cluster
    assert b.log_append_many([], 60) == []
    assert b.log_append(k2, 0, [b"b0"], 60) == 1
    assert b.log_append_many([(k1, 0, [b"a0", b"a1"]), (k2, 0, [b"late"]), (k3, 0, [b"c0"])], 60) == [2, -2, 1]
    assert b.log_append_many([(k1, 2, [b"a2"]), (k2, 1, [b"b1"])], 60) == [3, 2]
    assert [bytes(v) for v in b.log_read(k1, 0, 10)] == [b"a0", b"a1", b"a2"]
    assert [bytes(v) for v in b.log_read(k2, 0, 10)] == [b"b0", b"b1"]
    assert [bytes(v) for v in b.log_read(k3, 0, 10)] == [b"c0"]
    assert b.log_append_many([(k3, 0, [b"x"])], 0.3) == [-2]  # refused: nothing written, no new expiry
    assert b.log_append_many([(k3, 1, [b"c1"])], 0.3) == [2]
    time.sleep(0.6)
    assert b.log_read(k3, 0, 10) == [] and b.log_read(k1, 0, 1) == [b"a0"]


def test_event_list_expires_after_its_last_append(make_backend, key):
    b = make_backend()
    assert b.log_append(key, 0, [b"e0"], 0.3) == 1
    time.sleep(0.6)
    assert b.log_read(key, 0, 10) == []
    assert b.log_append(key, 0, [b"fresh"], 60) == 1  # an expired list starts again at 0


def test_jobs_registry_lease_events_and_cancel(store):
    from cache.jobs import JobStore

    jobs = JobStore(store, ttl=60, lease_seconds=5)
    tenant, jid = uuid.uuid4().hex[:12], "resp_" + uuid.uuid4().hex
    run(jobs.put_job(tenant, jid, {"kind": "test", "n": 1}))
    assert run(jobs.get_job(tenant, jid)) == {"kind": "test", "n": 1}
    assert (tenant, jid) in run(jobs.list_jobs())
    assert run(jobs.claim(tenant, jid, "a")) and not run(jobs.claim(tenant, jid, "b"))
    assert run(jobs.renew(tenant, jid, "a")) and not run(jobs.renew(tenant, jid, "b"))
    assert run(jobs.append_events(tenant, jid, 0, [{"i": 0}, {"i": 1}]))
    assert not run(jobs.append_events(tenant, jid, 0, [{"i": 9}]))
    assert run(jobs.read_events(tenant, jid, 1)) == [{"i": 1}]
    assert run(jobs.get_job("other-tenant", jid)) is None and run(jobs.read_events("other-tenant", jid, 0)) == []
    assert not run(jobs.is_cancelled(tenant, jid))
    run(jobs.mark_cancelled(tenant, jid))
    assert run(jobs.is_cancelled(tenant, jid))
    run(jobs.release(tenant, jid, "a"))
    assert run(jobs.claim(tenant, jid, "b"))
    run(jobs.delete(tenant, jid))
    assert run(jobs.get_job(tenant, jid)) is None and run(jobs.read_events(tenant, jid, 0)) == []
    assert (tenant, jid) not in run(jobs.list_jobs()) and not run(jobs.is_cancelled(tenant, jid))


def test_jobs_append_and_look_for_cancels_of_many_jobs_at_once(store):
    from cache.jobs import JobStore

    jobs = JobStore(store, ttl=60, lease_seconds=5)
    tenant = uuid.uuid4().hex[:12]
    a, b = ("resp_" + uuid.uuid4().hex for _ in range(2))
    assert run(jobs.append_many([])) == []
    assert run(jobs.append_events(tenant, b, 0, [{"i": 0}]))
    assert run(jobs.append_many([(tenant, a, 0, [{"i": 0}, {"i": 1}]), (tenant, b, 0, [{"i": 9}])])) == [True, False]
    assert run(jobs.read_all_events(tenant, a)) == [{"i": 0}, {"i": 1}]
    assert run(jobs.read_all_events(tenant, b)) == [{"i": 0}]
    run(jobs.mark_cancelled(tenant, b))
    assert run(jobs.cancelled_among([(tenant, a), (tenant, b), ("other-tenant", b)])) == [False, True, False]
    assert run(jobs.cancelled_among([])) == []
    for jid in (a, b):
        run(jobs.delete(tenant, jid))

"""The backend contract of tests/integration/test_store_contract.py, run again on a real local Redis
Cluster (three masters), plus what only a cluster has: many slots, a scan over every primary, a
master that dies and returns.

The contract's tests (and its ``key``/``store`` fixtures) and the scan tests of
tests/integration/test_cache_scan.py are collected here with this module's ``make_backend`` and
``backend``, so a test added to either runs on the cluster too. Tests that need a byte
budget are skipped: on a cluster the budget is each node's maxmemory (cache/redis_cluster.py).
"""

from __future__ import annotations

import inspect
import uuid

import pytest

from cache import keys
from cache.base import Backend, BackendUnavailable
from tests.integration import test_cache_scan as scan_contract
from tests.integration import test_store_contract as contract

pytestmark = [pytest.mark.redis]


def _runs_on_a_backend(fn) -> bool:
    params = inspect.signature(fn).parameters
    return "make_backend" in params or "store" in params


for _name, _obj in vars(contract).items():
    if _name.startswith("test_") and inspect.isfunction(_obj) and _runs_on_a_backend(_obj):
        globals()[_name] = _obj
for _name, _obj in vars(scan_contract).items():
    if _name.startswith("test_") and inspect.isfunction(_obj) and \
            "backend" in inspect.signature(_obj).parameters:
        globals()["test_scan_contract_" + _name.removeprefix("test_")] = _obj
key = contract.key
store = contract.store


@pytest.fixture
def make_backend(redis_cluster_url):
    """Fresh cluster backends (every test uses keys of its own)."""
    from cache.redis_cluster import RedisClusterBackend

    made: list[Backend] = []

    def make(max_bytes: int = 0) -> Backend:
        if max_bytes:
            pytest.skip("a cluster's byte budget is each node's maxmemory + allkeys-lru, not kvbento's")
        b = RedisClusterBackend(redis_cluster_url, timeout=2.0)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def backend(make_backend) -> Backend:
    return make_backend()


def _slot(k: str) -> int:
    from redis.crc import key_slot

    return key_slot(k.encode())


def test_keys_spread_over_every_master_and_a_request_ids_keys_share_a_slot(make_backend, redis_cluster_url):
    b = make_backend()
    tenant = "t-" + uuid.uuid4().hex[:8]
    heads = [keys.head_key(tenant, f"r{i}") for i in range(60)]
    blocks = [keys.block_key(tenant, f"{i:016x}") for i in range(60)]
    for k in heads + blocks:
        b.set(k, k.encode())
    assert all(b.exists(heads + blocks))
    assert [b.get(k) for k in heads + blocks] == [k.encode() for k in heads + blocks]
    client = b._client()
    owners = {client.get_node_from_key(k).name for k in heads + blocks}
    assert len(owners) == 3, "keys must spread over the three masters"
    for i in range(5):  # a head, its lease and its response live together (one slot, one node)
        rid = f"r{i}"
        assert _slot(keys.head_key(tenant, rid)) == _slot(keys.lease_key(tenant, rid)) == \
            _slot(keys.response_key(tenant, rid))


def test_scan_pages_through_every_primary_exactly_once(make_backend):
    b = make_backend()
    tenant = "scan-" + uuid.uuid4().hex[:8]
    wanted = {keys.head_key(tenant, f"conv-{i}") for i in range(37)}
    for k in wanted:
        b.set(k, b"h")
    b.set(keys.head_key("other-" + tenant, "conv-1"), b"not mine")
    for limit in (1, 5, 200):
        seen: list[str] = []
        cursor = None
        while True:
            page, cursor = b.scan(keys.head_key_prefix(tenant), cursor, limit)
            assert len(page) <= limit
            seen += page
            if cursor is None:
                break
        assert sorted(seen) == sorted(wanted), limit
    assert {keys.request_id_of(tenant, k) for k in wanted} == {f"conv-{i}" for i in range(37)}


def test_glob_characters_in_the_prefix_match_literally(make_backend):
    b = make_backend()
    tenant = "glob*[x]?-" + uuid.uuid4().hex[:8]
    b.set(keys.head_key(tenant, "a"), b"1")
    b.set(keys.head_key(tenant.replace("*", "Z"), "a"), b"2")  # would match an unescaped '*'
    page, cursor = b.scan(keys.head_key_prefix(tenant), None, 100)
    while cursor is not None:
        more, cursor = b.scan(keys.head_key_prefix(tenant), cursor, 100)
        page += more
    assert page == [keys.head_key(tenant, "a")]


def test_url_parsing_and_refusals():
    from cache.factory import open_backend
    from cache.redis_cluster import RedisClusterBackend, parse_url
    from config import Settings

    opts = parse_url("redis+cluster://user:p%40ss@10.0.0.1:7000,redis-1.svc:7001/?ssl=true")
    assert [(n.host, n.port) for n in opts["startup_nodes"]] == [("10.0.0.1", 7000), ("redis-1.svc", 7001)]
    assert (opts["username"], opts["password"], opts["ssl"]) == ("user", "p@ss", True)
    assert parse_url("redis+cluster://h:1")["password"] is None
    for bad in ("redis+cluster://", "redis+cluster://host", "redis+cluster://h:1/2",
                "redis+cluster://h:1/?timeout=3", "redis+cluster://h:99999"):
        with pytest.raises(ValueError):
            parse_url(bad)
    with pytest.raises(ValueError, match="maxmemory"):
        RedisClusterBackend("redis+cluster://h:1", max_bytes=1 << 30)
    # The server starts while the cluster is down: nothing is contacted before the first call.
    from launcher import free_port

    b = open_backend(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.5)
    assert isinstance(b, RedisClusterBackend)
    with pytest.raises(BackendUnavailable):
        b.get("k")
    assert Settings(cache_url="redis+cluster://a:1,b:2").cache_url.startswith("redis+cluster://")


@pytest.mark.slow
def test_a_dead_master_costs_only_its_slots_and_its_return_is_picked_up(redis_cluster_factory):
    from cache.redis_cluster import RedisClusterBackend

    cluster = redis_cluster_factory()
    b = RedisClusterBackend(cluster.url, timeout=1.0)
    try:
        ks = [keys.block_key("t", f"{i:016x}") for i in range(40)]
        for k in ks:
            b.set(k, b"kv")
        victim = cluster.ports[0]
        on_victim = [k for k in ks if b._client().get_node_from_key(k).port == victim]
        elsewhere = [k for k in ks if k not in on_victim]
        assert on_victim and elsewhere
        cluster.kill(0)
        for k in on_victim:
            with pytest.raises(BackendUnavailable):
                b.get(k)
        assert [b.get(k) for k in elsewhere] == [b"kv"] * len(elsewhere)
        b.set(elsewhere[0], b"written while a master is down")
        cluster.restart(0)
        assert [b.get(k) for k in on_victim] == [None] * len(on_victim)  # back, empty: misses
        b.set(on_victim[0], b"again")
        assert b.get(on_victim[0]) == b"again"
        assert b.get(elsewhere[0]) == b"written while a master is down"
    finally:
        b.close()


def test_values_come_through_the_bulk_reader_and_a_stale_slot_map_follows_moved(make_backend):
    import os

    b = make_backend()
    k = keys.block_key("t", uuid.uuid4().hex[:16])
    value = os.urandom(3 << 20)
    b.set(k, value)
    got = b.get(k)
    assert isinstance(got, memoryview) and bytes(got) == value  # a pooled buffer, not fresh bytes
    r = b._client()
    owner = r.get_node_from_key(k)
    other = next(n for n in r.get_primaries() if n.name != owner.name)
    r.nodes_manager.slots_cache[r.keyslot(k)] = [other]  # the map a resharding leaves behind
    assert bytes(b.get(k)) == value  # `other` answers MOVED; redis-py follows it
    assert r.get_node_from_key(k).name == owner.name  # and the map is right again

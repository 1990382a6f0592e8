"""Backend.scan on diskcache and a real Redis: a prefix's keys, page by page, values never read."""

from __future__ import annotations

import time
import uuid

import pytest

from cache import keys
from cache.base import Backend


@pytest.fixture(params=["disk", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "disk":
        from cache.disk import DiskBackend

        b = DiskBackend(str(tmp_path / "scan"))
    else:
        from cache.redis import RedisBackend

        b = RedisBackend(request.getfixturevalue("redis_url"), timeout=2.0,
                         namespace=f"scantest-{uuid.uuid4().hex[:8]}")
    yield b
    b.close()


def scan_all(b: Backend, prefix: str, limit: int) -> list[str]:
    seen, cursor = [], None
    for _ in range(10_000):
        page, cursor = b.scan(prefix, cursor, limit)
        # Redis never splits one SCAN step: a page can pass the limit by that step's few keys.
        assert len(page) <= limit + (8 if b.scheme == "redis" else 0)
        seen += page
        if cursor is None:
            return seen
    raise AssertionError("scan did not end")


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_scan_pages_through_every_head_of_a_tenant_and_nothing_else(backend, limit):
    tenant = "t" + uuid.uuid4().hex[:8]
    wanted = {keys.head_key(tenant, f"conv-{i}") for i in range(23)}
    for k in wanted:
        backend.set(k, b"head")
    backend.set(keys.block_key(tenant, "ab" * 8), b"block")  # same tenant, not a head
    backend.set(keys.head_key(tenant + "x", "conv-1"), b"another tenant, same start")
    assert backend.acquire(keys.lease_key(tenant, "conv-1"), "tok", 60)
    seen = scan_all(backend, keys.head_key_prefix(tenant) + "conv-", limit)
    assert set(seen) == wanted
    if backend.scheme == "disk":  # in key order, each key once
        assert seen == sorted(wanted)


def test_scan_prefix_of_request_ids(backend):
    tenant = "t" + uuid.uuid4().hex[:8]
    for rid in ("chat-1", "chat-2", "chatter", "fork-1"):
        backend.set(keys.head_key(tenant, rid), b"head")
    found = scan_all(backend, keys.head_key_prefix(tenant) + "chat-", 10)
    got = {keys.request_id_of(tenant, k) for k in found}
    assert got == {"chat-1", "chat-2"}


def test_scan_treats_pattern_characters_literally(backend):
    tenant = "t" + uuid.uuid4().hex[:8]
    for rid in ("a*b", "axb", "a?c", "a[1]", "a1", "a\\d", "%_x", "zz"):
        backend.set(keys.head_key(tenant, rid), b"head")
    start = keys.head_key_prefix(tenant)
    cases = (("a*", {"a*b"}), ("a?", {"a?c"}), ("a[", {"a[1]"}), ("a\\", {"a\\d"}), ("%_", {"%_x"}))
    for prefix, want in cases:
        assert {keys.request_id_of(tenant, k) for k in scan_all(backend, start + prefix, 5)} == want, prefix


def test_scan_leaves_out_expired_keys(backend):
    tenant = "t" + uuid.uuid4().hex[:8]
    backend.set(keys.head_key(tenant, "short"), b"head", ttl=0.2)
    backend.set(keys.head_key(tenant, "long"), b"head", ttl=60)
    time.sleep(0.4)
    assert scan_all(backend, keys.head_key_prefix(tenant), 10) == [keys.head_key(tenant, "long")]


def test_scan_of_an_empty_prefix_range_ends_at_once(backend):
    page, cursor = backend.scan(keys.head_key_prefix("nobody-" + uuid.uuid4().hex), None, 10)
    assert page == [] and cursor is None


def test_disk_scan_at_the_top_of_unicode():
    from cache.disk import _prefix_end

    assert _prefix_end("ab") == "ac"
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\U0010ffff") is None
    assert _prefix_end("a\ud7ff") == "a\ue000"  # never a surrogate

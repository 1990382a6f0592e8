"""GET /api/cache against a real `bentoml serve` on a private Redis: a tenant's request_ids, paged,
filtered by prefix, with their metadata; bad queries are 4xx naming the field; Redis down is a 503."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.e2e

KEY_A, KEY_B = "list-key-a", "list-key-b"


@pytest.fixture(scope="module")
def redis_srv(redis_server_factory):
    return redis_server_factory()


@pytest.fixture(scope="module")
def srv(server_factory, redis_srv):
    s = server_factory({"KVBENTO_API_KEYS": f"{KEY_A},{KEY_B}", "KVBENTO_CACHE_URL": redis_srv.url})
    yield s
    s.stop()  # its Redis is killed below: it serves nothing else


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(srv, key: str, rid: str, n: int = 4, prompt: str = "list me") -> None:
    r = requests.post(srv.url + "/api/generate", headers=auth(key), timeout=60, json={
        "request_id": rid, "prompt": prompt, "stream_response": False,
        "generation_config": {"do_sample": False, "max_new_tokens": n}})
    assert r.status_code == 200, r.text


def listing(srv, key: str, **params) -> requests.Response:
    return requests.get(srv.url + "/api/cache", params=params, headers=auth(key), timeout=30)


def all_pages(srv, key: str, **params) -> list[dict]:
    rows, cursor = [], None
    for _ in range(1000):
        r = listing(srv, key, **params, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        body = r.json()
        rows += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("no last page")


def test_list_pages_filters_and_isolates_tenants(srv):
    for i in range(5):  # conv-4 spans several 64-token KV blocks besides its head
        generate(srv, KEY_A, f"conv-{i}", n=4 + i, prompt="list me " * (60 if i == 4 else 1))
    generate(srv, KEY_A, "other-1")
    generate(srv, KEY_B, "conv-b")

    rows = all_pages(srv, KEY_A, prefix="conv-", limit=2)
    assert sorted(r["request_id"] for r in rows) == [f"conv-{i}" for i in range(5)]
    by_id = {r["request_id"]: r for r in rows}
    for i in range(5):
        info = requests.get(f"{srv.url}/api/cache/conv-{i}", headers=auth(KEY_A), timeout=10).json()
        row = by_id[f"conv-{i}"]
        assert row["tokens"] == info["tokens"] and row["tokens"] > 0
        assert row["created_at"] == info["created_at"] and row["last_used_at"]
        # One meaning of bytes: the list and the record say the same (head + its blocks).
        assert (row["bytes"], row["head_bytes"], row["blocks"]) == (info["bytes"], info["head_bytes"], info["blocks"])
        assert row["bytes"] >= row["head_bytes"] > 0
        assert "expires_at" in row
    assert by_id["conv-4"]["blocks"] > 0 and by_id["conv-4"]["bytes"] > by_id["conv-4"]["head_bytes"]
    assert {r["request_id"] for r in all_pages(srv, KEY_A)} >= {"other-1", *by_id}
    assert [r["request_id"] for r in all_pages(srv, KEY_B)] == ["conv-b"]  # the other tenant's own only

    # A deleted request_id leaves the list.
    assert requests.delete(f"{srv.url}/api/cache/conv-0", headers=auth(KEY_A), timeout=10).status_code == 204
    assert "conv-0" not in {r["request_id"] for r in all_pages(srv, KEY_A, prefix="conv-")}


@pytest.mark.parametrize("params, field", [
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"prefix": "a b"}, "prefix"), ({"prefix": "a/b"}, "prefix"), ({"prefix": "x" * 257}, "prefix"),
    ({"cursor": "not-a-cursor"}, "cursor"), ({"sort": "asc"}, "sort"),
])
def test_bad_queries_are_400_naming_the_field(srv, params, field):
    r = listing(srv, KEY_A, **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_needs_a_key(srv):
    r = requests.get(srv.url + "/api/cache", timeout=10)
    assert r.status_code == 401 and r.headers.get("WWW-Authenticate") == "Bearer"
    assert listing(srv, "wrong").status_code == 401


def test_store_down_is_503_json(srv, redis_srv):
    redis_srv.kill()
    r = listing(srv, KEY_A)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "unavailable_error"

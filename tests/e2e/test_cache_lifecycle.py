"""Cache life cycle end to end on Redis: records expire after KVBENTO_CACHE_TTL and the least
recently used ones are evicted past KVBENTO_CACHE_MAX_BYTES, through a real `bentoml serve`."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

TTL = 20
BUDGET = 150_000  # bytes: a few records of the tiny model (about 3 KiB per token)
PROMPT = "import os\nimport sys\n"


@pytest.fixture(scope="module")
def server(server_factory, redis_server_factory):
    redis_srv = redis_server_factory()  # its own Redis: the budget counts only this test's records
    s = server_factory({"KVBENTO_CACHE_URL": redis_srv.url, "KVBENTO_CACHE_TTL": str(TTL),
                        "KVBENTO_CACHE_MAX_BYTES": str(BUDGET)})
    yield s
    s.stop()
    redis_srv.kill()


def gen(url: str, rid: str, n: int = 4) -> requests.Response:
    body = {"request_id": rid, "prompt": PROMPT, "stream_response": False,
            "generation_config": {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}}
    r = requests.post(url + "/api/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def info(url: str, rid: str) -> requests.Response:
    return requests.get(f"{url}/api/cache/{rid}", timeout=30)


def test_metadata_and_delete(server):
    rid = "meta-" + uuid.uuid4().hex
    gen(server.url, rid)
    r = info(server.url, rid)
    assert r.status_code == 200
    meta = r.json()
    assert meta["request_id"] == rid and meta["model"] and meta["bytes"] > 0
    assert meta["tokens"] == meta["prompt_tokens"] + 4
    assert meta["created_at"] and meta["last_used_at"] and meta["expires_at"]
    assert requests.delete(f"{server.url}/api/cache/{rid}", timeout=30).status_code == 204
    assert info(server.url, rid).status_code == 404
    assert requests.delete(f"{server.url}/api/cache/{rid}", timeout=30).status_code == 404


def test_byte_budget_evicts_least_recently_used(server):
    url = server.url
    ids = ["lru-" + uuid.uuid4().hex for _ in range(8)]
    gen(url, ids[0])
    size = info(url, ids[0]).json()["bytes"]
    fit = BUDGET // size
    assert 2 <= fit < 7, f"budget {BUDGET} holds {fit} records of {size} bytes; adjust the test"
    for rid in ids[1:fit]:
        gen(url, rid)
    assert all(info(url, rid).status_code == 200 for rid in ids[:fit])  # all fit so far
    assert gen(url, ids[0], 1).headers["X-KV-Cache"] == "hit"  # ids[0] is now the most recent
    gen(url, ids[fit])
    # Least recently used first: ids[1], ..., ids[fit-1], ids[0], ids[fit]. What is left must be
    # the newest end of that order, as much of it as fits the budget, every record whole.
    order = [*ids[1:fit], ids[0], ids[fit]]
    present = [rid for rid in order if info(url, rid).status_code == 200]
    assert ids[1] not in present and ids[0] in present and ids[fit] in present
    assert present == order[len(order) - len(present):]
    total = sum(info(url, rid).json()["bytes"] for rid in present)
    assert total <= BUDGET < total + size
    assert gen(url, ids[1]).headers["X-KV-Cache"] == "miss"  # evicted: generated afresh


def test_ttl_expiry(server):
    rid = "ttl2-" + uuid.uuid4().hex
    gen(server.url, rid)
    meta = info(server.url, rid).json()
    assert meta["expires_at"]
    time.sleep(TTL + 1)
    assert info(server.url, rid).status_code == 404
    assert gen(server.url, rid).headers["X-KV-Cache"] == "miss"

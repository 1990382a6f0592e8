"""Two `bentoml serve` replicas on one Redis: continuation across replicas and restarts, one writer
per request_id, tenant isolation, client disconnects, and a Redis outage (killed, then restarted).

The module runs its own redis-server (killed by PID in the outage test, which therefore runs last).
"""

from __future__ import annotations

import re
import threading
import time
import uuid

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

KEY_A, KEY_B = "key-alpha-0001", "key-bravo-0002"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
PROMPT = "def main():\n    print("


@pytest.fixture(scope="module")
def redis_srv(redis_server_factory):
    return redis_server_factory()


@pytest.fixture(scope="module")
def env(redis_srv) -> dict[str, str]:
    return {"KVBENTO_CACHE_URL": redis_srv.url, "KVBENTO_CACHE_TIMEOUT": "1",
            "KVBENTO_API_KEYS": f"{KEY_A},{KEY_B}"}


@pytest.fixture(scope="module")
def replicas(server_factory, env):
    servers = [server_factory(env), server_factory(env)]
    yield servers
    for s in servers:  # free the CPU and memory for the modules that follow
        s.stop()


def gen(url: str, rid: str, n: int, headers: dict = A, prompt: str = PROMPT) -> requests.Response:
    """A greedy, non-streaming request of exactly n new tokens; the answer holds the whole text."""
    body = {"request_id": rid, "prompt": prompt, "stream_response": False, "only_new_tokens": False,
            "generation_config": {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}}
    return requests.post(url + "/api/generate", json=body, headers=headers, timeout=120)


def full_text(r: requests.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["response"]


def fresh(url: str, n: int) -> str:
    return full_text(gen(url, "ref-" + uuid.uuid4().hex, n))


def test_auth_required(replicas):
    r = requests.post(replicas[0].url + "/api/generate", json={"request_id": "x", "prompt": "p"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"]
    r = requests.get(replicas[0].url + "/api/cache/x", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401
    assert requests.get(replicas[0].url + "/readyz", timeout=30).status_code == 200


def test_continue_on_the_other_replica(replicas):
    rid = "xr-" + uuid.uuid4().hex
    r1 = gen(replicas[0].url, rid, 12)
    assert r1.headers["X-KV-Cache"] == "miss"
    r2 = gen(replicas[1].url, rid, 12)
    assert r2.headers["X-KV-Cache"] == "hit"
    assert r2.json()["usage"]["completion_tokens"] == 12
    assert full_text(r2) == fresh(replicas[0].url, 24)
    info = requests.get(f"{replicas[1].url}/api/cache/{rid}", headers=A, timeout=30).json()
    assert info["tokens"] == info["prompt_tokens"] + 24 and info["bytes"] > 0 and info["fingerprint_matches"]


def test_concurrent_same_request_id_is_serialized(replicas):
    rid = "cc-" + uuid.uuid4().hex
    results: list[requests.Response] = []

    def worker(i: int) -> None:
        results.append(gen(replicas[i % 2].url, rid, 6))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 4 and all(r.status_code == 200 for r in results), [r.text for r in results]
    assert sorted(r.headers["X-KV-Cache"] for r in results) == ["hit", "hit", "hit", "miss"]
    info = requests.get(f"{replicas[0].url}/api/cache/{rid}", headers=A, timeout=30).json()
    assert info["tokens"] == info["prompt_tokens"] + 24
    # The stored sequence is one clean greedy run: one more token continues it exactly.
    assert full_text(gen(replicas[0].url, rid, 1)) == fresh(replicas[1].url, 25)


def test_tenants_cannot_see_each_other(replicas):
    rid = "tn-" + uuid.uuid4().hex
    url = replicas[0].url
    assert gen(url, rid, 5, A).headers["X-KV-Cache"] == "miss"
    assert requests.get(f"{url}/api/cache/{rid}", headers=B, timeout=30).status_code == 404
    assert requests.delete(f"{url}/api/cache/{rid}", headers=B, timeout=30).status_code == 404
    rb = gen(replicas[1].url, rid, 3, B)
    assert rb.headers["X-KV-Cache"] == "miss"  # B starts its own sequence under the same name
    assert rb.json()["usage"]["cached_tokens"] == 0
    info_a = requests.get(f"{url}/api/cache/{rid}", headers=A, timeout=30).json()
    assert info_a["tokens"] == info_a["prompt_tokens"] + 5
    assert gen(url, rid, 1, A).headers["X-KV-Cache"] == "hit"
    assert requests.delete(f"{url}/api/cache/{rid}", headers=B, timeout=30).status_code == 204
    assert requests.get(f"{url}/api/cache/{rid}", headers=A, timeout=30).status_code == 200


def test_disconnect_keeps_only_delivered_tokens(replicas):
    rid = "dc-" + uuid.uuid4().hex
    url = replicas[0].url
    body = {"request_id": rid, "prompt": PROMPT, "stream_response": True, "only_new_tokens": True,
            "generation_config": {"do_sample": False, "max_new_tokens": 1500, "min_new_tokens": 1500}}
    received = ""
    with requests.post(url + "/api/generate", json=body, headers=A, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for i, chunk in enumerate(r.iter_content(chunk_size=None)):
            received += chunk.decode("utf-8", errors="ignore")
            if i >= 5:
                break
    info = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = requests.get(f"{url}/api/cache/{rid}", headers=A, timeout=30)
        if got.status_code == 200:
            info = got.json()
            break
        time.sleep(0.2)
    assert info is not None, "the aborted stream left no record"
    num_generated = info["tokens"] - info["prompt_tokens"]
    assert 1 <= num_generated < 1500, num_generated
    # The record continues exactly like one greedy run of (kept + 8) tokens.
    cont = gen(url, rid, 8)
    assert cont.headers["X-KV-Cache"] == "hit"
    text = full_text(cont)
    assert text == fresh(url, num_generated + 8)
    assert text.startswith(PROMPT + received[:20])


def test_restarted_replica_continues(replicas, server_factory, env):
    rid = "rs-" + uuid.uuid4().hex
    assert gen(replicas[1].url, rid, 12).status_code == 200
    replicas[1].stop()
    replicas[1] = server_factory(env)
    r = gen(replicas[1].url, rid, 12)
    assert r.headers["X-KV-Cache"] == "hit"
    assert full_text(r) == fresh(replicas[0].url, 24)


def test_redis_outage_degrades_to_misses_and_recovers(replicas, redis_srv, redis_server_factory):
    url = replicas[0].url
    rid = "ou-" + uuid.uuid4().hex
    assert gen(url, rid, 3).status_code == 200
    port = redis_srv.port
    redis_srv.kill()
    statuses = []
    for i in range(4):
        r = gen(replicas[i % 2].url, rid, 3)
        assert r.status_code == 200, r.text  # never a 5xx for generation
        statuses.append(r.headers["X-KV-Cache"])
    assert statuses == ["unavailable"] * 4
    log = replicas[0].log_path.read_text(errors="replace")
    assert len(re.findall(r"KV store redis unavailable", log)) == 1  # once per outage, not per request

    redis_server_factory(port)  # same port, empty (no persistence)
    deadline = time.monotonic() + 30
    status = "unavailable"
    while status == "unavailable" and time.monotonic() < deadline:
        status = gen(url, rid, 3).headers["X-KV-Cache"]
    assert status == "miss"
    assert gen(replicas[1].url, rid, 3).headers["X-KV-Cache"] == "hit"
    assert "is back" in replicas[0].log_path.read_text(errors="replace")

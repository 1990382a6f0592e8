"""The request-id cache API against a real `bentoml serve`: continuation, persistence, bad input."""

from __future__ import annotations

import json

import diskcache
import pytest
import requests

from cache import keys
from cache.codec import decode

pytestmark = pytest.mark.e2e

PROMPT = "[INST] Generate a very long poem about 1000 cats [/INST]\n\n"
GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def srv(server):
    return server


@pytest.fixture(scope="module")
def cache_dir(srv) -> str:
    """The directory of the server's disk store (its records are damaged on purpose below)."""
    return srv.env["KVBENTO_CACHE_URL"].removeprefix("disk://")


def gen(srv, rid, n, *, stream=False, only_new=True, prompt=PROMPT, **cfg):
    body = {"request_id": rid, "prompt": prompt, "only_new_tokens": only_new, "stream_response": stream,
            "generation_config": {**GREEDY, "max_new_tokens": n, **cfg}}
    return requests.post(srv.url + "/api/generate", json=body, timeout=60)


def test_continuation_12_plus_12_equals_one_24_token_run(srv):
    a = gen(srv, "poem", 12)
    b = gen(srv, "poem", 12, prompt="this prompt is ignored: the cache exists")
    ref = gen(srv, "poem-ref", 24)
    assert a.status_code == b.status_code == ref.status_code == 200
    assert a.headers["X-KV-Cache"] == "miss" and b.headers["X-KV-Cache"] == "hit"
    assert a.json()["response"] + b.json()["response"] == ref.json()["response"]
    usage = b.json()["usage"]
    assert usage["completion_tokens"] == 12 and usage["cached_tokens"] > 0
    full = gen(srv, "poem-ref", 1, only_new=False).json()
    assert full["prompt"] == PROMPT and full["response"].startswith(PROMPT + ref.json()["response"])


def test_streaming_equals_non_streaming_and_arrives_in_chunks(srv):
    with requests.post(srv.url + "/api/generate", stream=True, timeout=60, json={
            "request_id": "s1", "prompt": PROMPT, "generation_config": {**GREEDY, "max_new_tokens": 16}}) as r:
        assert r.status_code == 200 and r.headers["X-KV-Cache"] == "miss"
        assert r.headers["content-type"].startswith("text/plain")
        chunks = [c for c in r.iter_content(chunk_size=None) if c]
    text = b"".join(chunks).decode()
    assert len(chunks) > 1
    assert text == gen(srv, "s1-ref", 16).json()["response"]


def test_streaming_continuation_with_full_sequence(srv):
    gen(srv, "s2", 6)
    r = gen(srv, "s2", 6, stream=True, only_new=False)
    assert r.headers["X-KV-Cache"] == "hit"
    assert r.text == gen(srv, "s2-ref", 12, only_new=False).json()["response"]


def test_batch_matches_seed_shape_and_order(srv):
    body = {"prompts": [{"request_id": "b-dogs", "prompt": "dogs"}, {"request_id": "b-cats", "prompt": "cats"}],
            "only_new_tokens": False, "generation_config": {**GREEDY, "max_new_tokens": 8}}
    r = requests.post(srv.url + "/api/generate-batch", json=body, timeout=60)
    assert r.status_code == 200
    items = r.json()
    assert [i["request_id"] for i in items] == ["b-dogs", "b-cats"]
    assert all(set(i) == {"request_id", "prompt", "response"} for i in items)
    assert items[0]["prompt"] == "dogs" and items[0]["response"].startswith("dogs")
    # Order does not matter: each request_id continues its own record.
    body2 = {"prompts": list(reversed(body["prompts"])), "generation_config": {**GREEDY, "max_new_tokens": 4}}
    r2 = requests.post(srv.url + "/api/generate-batch", json=body2, timeout=60)
    assert r2.headers["X-KV-Cache"] == "hit"
    assert [set(i) for i in r2.json()] == [{"request_id", "response"}] * 2
    single = gen(srv, "b-cats-ref", 12, prompt="cats").json()["response"]
    assert items[1]["response"][len("cats"):] + r2.json()[0]["response"] == single


def test_cache_metadata_and_delete(srv):
    gen(srv, "meta", 5)
    info = requests.get(srv.url + "/api/cache/meta", timeout=10).json()
    assert info["tokens"] > 5 and info["bytes"] > 0
    assert requests.delete(srv.url + "/api/cache/meta", timeout=10).status_code == 204
    assert requests.get(srv.url + "/api/cache/meta", timeout=10).status_code == 404
    assert gen(srv, "meta", 2).headers["X-KV-Cache"] == "miss"


def test_corrupted_head_is_a_miss_not_wrong_output(srv, cache_dir):
    first = gen(srv, "corrupt", 8).json()["response"]
    store = diskcache.Cache(str(cache_dir))
    key = keys.head_key("public", "corrupt")
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0xFF  # as if a torn or foreign write: the checksum fails
    store.set(key, bytes(data))
    store.close()
    r = gen(srv, "corrupt", 8)
    assert r.status_code == 200 and r.headers["X-KV-Cache"] != "hit"
    assert r.json()["response"] == first  # regenerated from the prompt, not from damaged tensors


def test_damaged_blocks_do_not_reach_the_server_that_wrote_them(srv, cache_dir):
    """Blocks are immutable: the server restores its own from memory, so damage on disk does not
    matter to it (another replica would find the checksum wrong and recompute)."""
    long = PROMPT * 6
    first = gen(srv, "damaged-after", 8, prompt=long).json()["response"]
    store = diskcache.Cache(str(cache_dir))
    head = decode(store.get(keys.head_key("public", "damaged-after")))
    assert head.meta["blocks"]
    for h in head.meta["blocks"]:
        data = bytearray(store.get(keys.block_key("public", h)))
        data[len(data) // 2] ^= 0xFF
        store.set(keys.block_key("public", h), bytes(data))
    store.close()
    r = gen(srv, "damaged-after", 8, prompt=long)
    ref = gen(srv, "damaged-after-ref", 16, prompt=long)
    assert r.status_code == 200 and r.headers["X-KV-Cache"] == "hit"
    assert first + r.json()["response"] == ref.json()["response"]


BAD = [
    (b'{"request_id": "x", "prompt": ', "JSON"),
    (b'[1, 2]', "object"),
    (json.dumps({"prompt": "hi"}).encode(), "request_id"),
    (json.dumps({"request_id": "x"}).encode(), "prompt"),
    (json.dumps({"request_id": "x", "prompt": 5}).encode(), "prompt"),
    (json.dumps({"request_id": "x", "prompt": "p", "generation_config": {"max_new_tokens": -5}}).encode(),
     "max_new_tokens"),
    (json.dumps({"request_id": "x", "prompt": "p", "generation_config": {"max_new_tokens": 10**9}}).encode(),
     "max_new_tokens"),
    (json.dumps({"request_id": "x", "prompt": "p", "generation_config": {"top_p": 1.5}}).encode(), "top_p"),
    (json.dumps({"request_id": "x", "prompt": "p", "generation_config": {"temperature": -1}}).encode(),
     "temperature"),
    (json.dumps({"request_id": "x", "prompt": "p", "generation_config": {"num_beams": 0}}).encode(), "num_beams"),
    (json.dumps({"request_id": "x", "prompt": "p", "generation_config": {"bogus": 1}}).encode(), "bogus"),
    (json.dumps({"request_id": "x", "prompt": "word " * 5000}).encode(), "prompt"),
]


@pytest.mark.parametrize("body,names", BAD)
def test_bad_input_is_a_named_4xx(srv, body, names):
    r = requests.post(srv.url + "/api/generate", data=body, headers={"Content-Type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    assert names in err["message"] and err["type"]


def test_oversized_body_is_413_and_server_goes_on(srv):
    r = requests.post(srv.url + "/api/generate", data=b"x" * (5 << 20), timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert gen(srv, "after-bad", 2).status_code == 200


def test_duplicate_request_ids_in_batch_refused(srv):
    body = {"prompts": [{"request_id": "d", "prompt": "a"}, {"request_id": "d", "prompt": "b"}]}
    r = requests.post(srv.url + "/api/generate-batch", json=body, timeout=30)
    assert r.status_code == 400 and "more than once" in r.json()["error"]["message"]


def test_record_survives_a_server_restart(srv):
    a = gen(srv, "restart", 12).json()["response"]
    srv.stop()  # a new process on the same store: nothing of the first one's memory survives
    srv.start()
    b = gen(srv, "restart", 12)
    assert b.headers["X-KV-Cache"] == "hit"
    assert a + b.json()["response"] == gen(srv, "restart-ref", 24).json()["response"]

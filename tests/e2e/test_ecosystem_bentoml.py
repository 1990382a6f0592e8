"""BentoML's own client finds typed methods for the request-id API, while the seed paths keep their
answers; /health follows the engine."""

from __future__ import annotations

import uuid

import bentoml
import pytest
import requests

pytestmark = [pytest.mark.e2e]

KEY = "sk-eco-bento"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"do_sample": False, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def srv(keyed_server):
    return keyed_server  # KEY is one of its SHARED_KEYS (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def client(srv):
    with bentoml.SyncHTTPClient(srv.url, token=KEY, timeout=60) as c:
        yield c


def rid() -> str:
    return f"eco-{uuid.uuid4().hex[:10]}"


def test_schema_lists_typed_routes(srv):
    schema = requests.get(srv.url + "/schema.json", timeout=10).json()
    routes = {r["name"]: r for r in schema["routes"]}
    assert {"generate", "generate_stream", "generate_batch"} <= set(routes)
    assert routes["generate_stream"]["output"]["is_stream"] is True
    assert "request_id" in routes["generate"]["input"]["properties"]


def test_typed_generate_matches_the_seed_route(client, srv):
    a, b = rid(), rid()
    typed = client.generate(request_id=a, prompt="Cats are", generation_config=GREEDY)
    seed = requests.post(srv.url + "/api/generate", headers=AUTH, timeout=60, json={
        "request_id": b, "prompt": "Cats are", "stream_response": False, "generation_config": GREEDY}).json()
    assert typed["response"] == seed["response"] and typed["request_id"] == a
    assert typed["usage"]["completion_tokens"] == seed["usage"]["completion_tokens"]
    # The typed call wrote the same cache record: the seed route continues it.
    more = requests.post(srv.url + "/api/generate", headers=AUTH, timeout=60, json={
        "request_id": a, "prompt": "ignored", "stream_response": False, "generation_config": GREEDY})
    assert more.headers["X-KV-Cache"] == "hit"
    whole = client.generate(request_id=rid(), prompt="Cats are",
                            generation_config={"do_sample": False, "max_new_tokens": 16})
    assert typed["response"] + more.json()["response"] == whole["response"]


def test_typed_stream_and_batch(client):
    a = rid()
    chunks = list(client.generate_stream(request_id=a, prompt="Dogs are", generation_config=GREEDY))
    plain = client.generate(request_id=rid(), prompt="Dogs are", generation_config=GREEDY)
    assert len(chunks) >= 1 and "".join(chunks) == plain["response"]
    items = client.generate_batch(prompts=[{"request_id": rid(), "prompt": "x"},
                                           {"request_id": rid(), "prompt": "Dogs are"}],
                                  only_new_tokens=False, generation_config=GREEDY)
    assert [set(i) >= {"request_id", "prompt", "response"} for i in items] == [True, True]
    assert items[1]["response"].endswith(plain["response"])


def test_typed_errors_keep_their_status(client, srv):
    with pytest.raises(bentoml.exceptions.BentoMLException) as e:
        client.generate(request_id=rid(), prompt="x", generation_config={"top_p": 5})
    assert e.value.error_code == 400
    with pytest.raises(bentoml.exceptions.BentoMLException) as e:
        client.generate_batch(prompts=[{"request_id": "same", "prompt": "a"}, {"request_id": "same", "prompt": "b"}])
    assert e.value.error_code == 400 and "more than once" in str(e.value)
    with bentoml.SyncHTTPClient(srv.url, token="wrong", timeout=30) as bad:
        with pytest.raises(bentoml.exceptions.BentoMLException) as e:
            bad.generate(request_id=rid(), prompt="x")
    assert e.value.error_code == 401


def test_seed_routes_are_unchanged(srv):
    r = requests.post(srv.url + "/api/generate", headers=AUTH, timeout=60, data=(
        '{"request_id": "%s", "prompt": "hi", "generation_config": {"max_new_tokens": 4}}' % rid()))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    bad = requests.post(srv.url + "/api/generate", headers=AUTH, timeout=60,
                        json={"request_id": "x", "prompt": "hi", "generation_config": {"top_p": 2}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "generation_config.top_p"
    batch = requests.post(srv.url + "/api/generate-batch", headers=AUTH, timeout=60,
                          json={"prompts": [{"request_id": rid(), "prompt": "a"}], "generation_config": GREEDY})
    assert batch.status_code == 200 and set(batch.json()[0]) == {"request_id", "response"}


def test_health(srv):
    r = requests.get(srv.url + "/health", timeout=10)  # open, like /readyz
    assert r.status_code == 200 and r.json()["status"] == "ok"

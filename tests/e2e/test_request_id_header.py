"""Conversation-affine routing against a real `bentoml serve`: the request_id as the
``X-KV-Request-Id`` header (what a load balancer hashes), ``X-KV-Replica`` on every answer, and the
reuse counters split by source."""

from __future__ import annotations

import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

PROMPT = "The header carries the conversation"
REPLICA = "replica-a.1"


@pytest.fixture(scope="module")
def srv(tuned_server):
    return tuned_server  # KVBENTO_REPLICA_ID is REPLICA there


def gen(srv, n: int, *, rid: str | None = None, header: str | None = None, stream: bool = False):
    body = {"prompt": PROMPT, "stream_response": stream, "only_new_tokens": False,
            "generation_config": {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}}
    if rid is not None:
        body["request_id"] = rid
    headers = {"X-KV-Request-Id": header} if header is not None else {}
    return requests.post(srv.url + "/api/generate", json=body, headers=headers, timeout=60)


def test_header_alone_names_the_conversation_and_continues_it_exactly(srv):
    rid = "hdr-" + uuid.uuid4().hex
    a = gen(srv, 12, header=rid)
    b = gen(srv, 12, header=rid)
    ref = gen(srv, 24, rid="hdr-ref-" + uuid.uuid4().hex)
    assert a.status_code == b.status_code == ref.status_code == 200, (a.text, b.text)
    assert a.headers["X-KV-Cache"] == "miss" and b.headers["X-KV-Cache"] == "hit"
    assert a.json()["request_id"] == rid
    assert b.json()["response"] == ref.json()["response"]
    # The body's request_id and the header agreeing is the same conversation.
    c = gen(srv, 1, rid=rid, header=rid)
    assert c.status_code == 200 and c.headers["X-KV-Cache"] == "hit"


def test_body_and_header_disagreeing_is_a_400_naming_request_id(srv):
    r = gen(srv, 4, rid="body-id", header="header-id")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "request_id" and "header" in err["message"]
    assert r.headers["X-KV-Replica"] == REPLICA


def test_a_bad_header_value_is_validated_like_the_body_field(srv):
    r = gen(srv, 4, header="has/slash")
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"
    r = gen(srv, 4, header="")  # an empty header names no conversation: not silently a random one
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id"


def test_other_dialects_take_the_header_too(srv):
    rid = "hdr-oa-" + uuid.uuid4().hex
    body = {"model": "kvbento", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    first, again = (requests.post(srv.url + "/v1/completions", json=body, headers={"X-KV-Request-Id": rid},
                                  timeout=60) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text
    assert first.headers["X-KV-Cache"] == "miss" and again.headers["X-KV-Cache"] == "hit"
    bad = requests.post(srv.url + "/v1/completions", json={**body, "request_id": "other"},
                        headers={"X-KV-Request-Id": rid}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "request_id"


def test_batch_route_takes_the_header_as_a_routing_key_only(srv):
    body = {"prompts": [{"request_id": "hb-" + uuid.uuid4().hex, "prompt": "a"}],
            "generation_config": {"max_new_tokens": 2}}
    r = requests.post(srv.url + "/api/generate-batch", json=body, headers={"X-KV-Request-Id": "route-me"},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()[0]["request_id"] == body["prompts"][0]["request_id"]


def test_every_answer_names_the_replica(srv):
    streamed = gen(srv, 3, header="hdr-s-" + uuid.uuid4().hex, stream=True)
    assert streamed.status_code == 200 and streamed.headers["X-KV-Replica"] == REPLICA
    missing = requests.get(srv.url + "/api/cache/" + uuid.uuid4().hex, timeout=30)
    assert missing.status_code == 404 and missing.headers["X-KV-Replica"] == REPLICA


def test_default_replica_id_is_stable_within_a_process(server):
    ids = {gen(server, 1, rid="rep-" + uuid.uuid4().hex).headers["X-KV-Replica"] for _ in range(3)}
    assert len(ids) == 1
    (rid,) = ids
    assert rid != REPLICA and len(rid) == 12


def test_reuse_counters_exist_per_source(srv):
    text = requests.get(srv.url + "/metrics", timeout=10).text
    sources = {s.labels.get("source") for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "kvbento_kv_reuse_tokens_total"}
    assert sources == {"local", "store"}

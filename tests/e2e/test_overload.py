"""Overload: past KVBENTO_MAX_BATCH_SIZE running + KVBENTO_MAX_QUEUE waiting, every route answers
429 with Retry-After and a JSON error at once; accepted requests finish normally; nothing is 5xx."""

from __future__ import annotations

import threading
import time

import pytest
import requests

pytestmark = pytest.mark.e2e

BATCH, QUEUE = 2, 2
# Long, fixed-length generations (min = max) keep the accepted requests busy while the rest arrive.
LONG = {"max_new_tokens": 300, "min_new_tokens": 300}


@pytest.fixture(scope="module")
def small_server(server_factory):
    s = server_factory({"KVBENTO_MAX_BATCH_SIZE": str(BATCH), "KVBENTO_MAX_QUEUE": str(QUEUE)})
    yield s
    s.stop()  # free the CPU and memory for the modules that follow


def _assert_429(r: requests.Response) -> None:
    assert r.status_code == 429, (r.status_code, r.text[:300])
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body, "a 429 carries an error body"
    assert "busy" in r.text or "overloaded" in r.text, body


def test_burst_of_12_gets_429_for_the_excess_only(small_server):
    url = small_server.url + "/api/generate"
    barrier = threading.Barrier(12, timeout=30)
    results: list[tuple[int, float, requests.Response]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"request_id": f"burst-{i}", "prompt": f"burst number {i}", "stream_response": False,
                "generation_config": LONG}
        barrier.wait()
        r = requests.post(url, json=body, timeout=120)
        with lock:
            results.append((i, time.monotonic(), r))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert len(results) == 12, small_server.log()

    statuses = sorted(r.status_code for _, _, r in results)
    assert all(s in (200, 429) for s in statuses), statuses  # nothing 5xx, nothing else
    ok = [(t, r) for _, t, r in results if r.status_code == 200]
    rejected = [(t, r) for _, t, r in results if r.status_code == 429]
    assert len(ok) >= BATCH + QUEUE, statuses  # the first arrivals fill batch and queue
    assert rejected, statuses
    for _, r in rejected:
        _assert_429(r)
    for _, r in ok:
        assert r.json()  # a complete answer
    # "At once": every 429 came back before any accepted request had finished its generation.
    assert max(t for t, _ in rejected) < min(t for t, _ in ok)

    metrics = requests.get(small_server.url + "/metrics", timeout=10).text
    line = next(l for l in metrics.splitlines() if l.startswith("kvbento_request_rejected_total"))
    assert float(line.split()[-1]) >= len(rejected)


# One minimal body per route that generates; each must be refused while the server is full.
PROBES = [
    ("/api/generate", {"request_id": "probe", "prompt": "x", "stream_response": False}),
    ("/api/generate-batch", {"prompts": [{"request_id": "probe-b", "prompt": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4}),
    ("/generate", {"text": "x", "max_new_tokens": 4}),
    ("/generate_stream", {"text": "x", "max_new_tokens": 4}),
    ("/inference", {"prompt": "x", "max_tokens": 4}),
    ("/predict", {"prompt": "x", "max_tokens": 4}),
    ("/v1/generate", {"prompt": "x", "maxTokens": 4}),
    ("/v1/generate/stream", {"prompt": "x", "maxTokens": 4}),
]


def test_every_route_answers_429_while_full(small_server):
    # Fill the batch and the queue with streams whose bodies we do not read yet: the headers
    # come back as soon as each is accepted, and each then runs for hundreds of steps.
    holders = []
    try:
        for i in range(BATCH + QUEUE):
            r = requests.post(small_server.url + "/api/generate", stream=True, timeout=60,
                              json={"request_id": f"hold-{i}", "prompt": "hold", "stream_response": True,
                                    "generation_config": {"max_new_tokens": 1500, "min_new_tokens": 1500}})
            assert r.status_code == 200, r.text[:300]
            holders.append(r)
        for path, body in PROBES:
            r = requests.post(small_server.url + path, json=body, timeout=30)
            _assert_429(r)
    finally:
        for r in holders:
            r.close()  # a client disconnect aborts the stream
    # The server recovers: once the aborted streams leave, a request is served again.
    deadline = time.monotonic() + 60
    while True:
        r = requests.post(small_server.url + "/api/generate", timeout=60,
                          json={"request_id": "after", "prompt": "x", "stream_response": False,
                                "generation_config": {"max_new_tokens": 4}})
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text[:300]

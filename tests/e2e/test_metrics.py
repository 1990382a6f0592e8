"""/metrics (served by BentoML, multiprocess) carries kvbento's metrics, and they move as requests
are served: cache misses then hits, prompt and generated tokens, latency histograms, store bytes."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def scrape(url: str) -> dict[str, float]:
    """Every kvbento sample as ``name{label=value,...}`` -> value."""
    text = requests.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("kvbento_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
                if "le" in s.labels:
                    continue  # buckets: the _count and _sum samples are enough here
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def idle(url: str, timeout: float = 60) -> dict[str, float]:
    """A scrape once nothing runs or waits: the server is shared, and a module before this one may
    have left aborted streams finishing (the deltas below must be this test's own)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if m["kvbento_num_requests_running"] == m["kvbento_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.2)


def generate(url: str, request_id: str, n: int) -> dict:
    r = requests.post(url + "/api/generate", timeout=60, json={
        "request_id": request_id, "prompt": "metrics move", "stream_response": False,
        "only_new_tokens": True, "generation_config": {"max_new_tokens": n, "min_new_tokens": n}})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def test_metrics_are_exposed_with_zero_series(server):
    m = scrape(server.url)
    for name in ("kvbento_kv_store_lookups_total{result=hit}", "kvbento_kv_store_lookups_total{result=miss}",
                 "kvbento_kv_store_lookups_total{result=unavailable}", "kvbento_request_rejected_total",
                 "kvbento_num_requests_running", "kvbento_num_requests_waiting",
                 "kvbento_time_to_first_token_seconds_count", "kvbento_inter_token_latency_seconds_count",
                 "kvbento_e2e_request_latency_seconds_count", "kvbento_prompt_tokens_total",
                 "kvbento_generation_tokens_total", "kvbento_kv_store_read_seconds_count",
                 "kvbento_kv_store_write_seconds_count", "kvbento_kv_store_write_bytes_total",
                 "kvbento_kv_blocks{state=used}", "kvbento_kv_blocks{state=cached}",
                 "kvbento_kv_blocks{state=free}", "kvbento_kv_pool_bytes"):
        assert name in m, (name, sorted(m))


def test_engine_info_names_the_dtype_health_reports(server):
    health = requests.get(server.url + "/health", timeout=10).json()
    info = [k for k, v in scrape(server.url).items() if k.startswith("kvbento_engine_info{") and v == 1]
    assert len(info) == 1, info
    k = health["kernels"]
    assert info[0] == ("kvbento_engine_info{"
                       f"attention={k['attention']},batch_invariant={k['batch_invariant']},"
                       f"decode_step={k['decode_step']},device={health['device']},"
                       f"dtype={health['dtype']},dtype_reason={health['dtype_reason']},linears={k['linears']}}}")


def test_metrics_move_as_requests_are_served(server):
    before = idle(server.url)
    generate(server.url, "metrics-1", 6)  # a new request_id: miss, then a write
    mid = scrape(server.url)
    generate(server.url, "metrics-1", 5)  # the same request_id: hit, continued
    after = scrape(server.url)

    def d(a: dict, b: dict, name: str) -> float:
        return b.get(name, 0.0) - a.get(name, 0.0)

    assert d(before, mid, "kvbento_kv_store_lookups_total{result=miss}") == 1
    assert d(before, mid, "kvbento_kv_store_lookups_total{result=hit}") == 0
    assert d(mid, after, "kvbento_kv_store_lookups_total{result=hit}") == 1
    assert d(mid, after, "kvbento_kv_store_lookups_total{result=miss}") == 0
    assert d(before, mid, "kvbento_generation_tokens_total") == 6
    assert d(mid, after, "kvbento_generation_tokens_total") == 5
    assert d(before, mid, "kvbento_prompt_tokens_total") >= 1
    # The continuation's prompt is the whole stored sequence, and it was restored, not prefilled.
    assert d(mid, after, "kvbento_prompt_tokens_total") > d(before, mid, "kvbento_prompt_tokens_total")
    assert d(mid, after, "kvbento_cached_prompt_tokens_total") >= 1
    assert d(before, after, "kvbento_time_to_first_token_seconds_count") == 2
    assert d(before, after, "kvbento_e2e_request_latency_seconds_count") == 2
    assert d(before, after, "kvbento_inter_token_latency_seconds_count") == (6 - 1) + (5 - 1)
    assert d(before, after, "kvbento_request_success_total{finished_reason=length}") == 2
    assert d(before, mid, "kvbento_kv_store_write_bytes_total") > 0
    assert d(mid, after, "kvbento_kv_store_read_bytes_total") > 0
    assert d(before, after, "kvbento_kv_store_write_seconds_count") == 2
    assert after["kvbento_num_requests_running"] == 0
    assert after["kvbento_num_requests_waiting"] == 0
    assert after["kvbento_kv_blocks{state=used}"] == 0  # finished requests hold no KV blocks
    assert after["kvbento_kv_blocks{state=free}"] + after["kvbento_kv_blocks{state=cached}"] > 0
    assert after["kvbento_kv_pool_bytes"] > 0


def test_request_without_request_id_counts_tokens_and_one_store_lookup(server):
    before = idle(server.url)
    r = requests.post(server.url + "/v1/completions", timeout=60,
                      json={"prompt": "metrics move", "max_tokens": 3, "stream": False})
    assert r.status_code == 200, r.text[:300]
    after = scrape(server.url)
    completion = r.json()["usage"]["completion_tokens"]
    assert after["kvbento_generation_tokens_total"] - before["kvbento_generation_tokens_total"] == completion
    lookups = [k for k in after if k.startswith("kvbento_kv_store_lookups_total")]
    assert sum(after[k] - before.get(k, 0.0) for k in lookups) == 1  # its prefix, looked up once

"""The SSE dialects against a live `bentoml serve`: Together's /inference (its `sseclient` sample runs)
and the generic v1 API (/v1/generate, /v1/generate/stream read by the seed's reader with node fetch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.e2e]

KEY = "together-generic-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Alan Turing was"
READER = Path(__file__).parent / "js" / "generic_v1_reader.mjs"


@pytest.fixture(scope="module")
def srv(keyed_server):
    return keyed_server  # KEY is one of its SHARED_KEYS (tests/e2e/conftest.py)


def sse_events(resp: requests.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]


# --- Together ----------------------------------------------------------------------------------
# together-streaming.txt's sample code, unchanged but for the URL (the key comes from the env).
TOGETHER_SEED = '''
import json
import os

import requests
import sseclient

url = "{url}/inference"
model = "togethercomputer/RedPajama-INCITE-7B-Chat"
prompt = "Tell me a story\\n\\n"

print(f"Model: {{model}}")
print(f"Prompt: {{repr(prompt)}}")
print("Repsonse:")
print()

payload = {{
    "model": model,
    "prompt": prompt,
    "max_tokens": 512,
    "temperature": 0.7,
    "top_p": 0.7,
    "top_k": 50,
    "repetition_penalty": 1,
    "stream_tokens": True,
}}
headers = {{
    "accept": "application/json",
    "content-type": "application/json",
    "Authorization": f"Bearer {{os.environ['TOGETHER_API_KEY']}}",
}}

response = requests.post(url, json=payload, headers=headers, stream=True)
response.raise_for_status()

client = sseclient.SSEClient(response)
for event in client.events():
    if event.data == "[DONE]":
        break

    partial_result = json.loads(event.data)
    token = partial_result["choices"][0]["text"]
    print(token, end="", flush=True)
'''


def test_together_seed_sample_runs(srv):
    done = subprocess.run([sys.executable, "-c", TOGETHER_SEED.format(url=srv.url)], capture_output=True,
                          text=True, timeout=180, env={"PATH": "/usr/bin:/bin", "TOGETHER_API_KEY": KEY})
    assert done.returncode == 0, done.stderr[-2000:]
    head, _, story = done.stdout.partition("Repsonse:\n\n")
    assert head.startswith("Model: togethercomputer/") and story.strip()


def test_together_stream_matches_json(srv):
    body = {"model": "any", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": ["\n\n"]}
    plain = requests.post(srv.url + "/inference", json=body, headers=AUTH, timeout=60)
    assert plain.status_code == 200 and plain.headers["X-KV-Cache"] == "miss"
    j = plain.json()
    assert j["choices"][0]["text"] == j["output"]["choices"][0]["text"]
    with requests.post(srv.url + "/inference", json={**body, "stream_tokens": True}, headers=AUTH,
                       stream=True, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(p["result_type"] == "language-model-inference" and p["id"] == parsed[0]["id"] for p in parsed)
    assert "".join(p["choices"][0]["text"] for p in parsed) == j["choices"][0]["text"]
    assert parsed[-1]["choices"][0]["finish_reason"] == j["choices"][0]["finish_reason"]


def test_together_errors_before_stream(srv):
    r = requests.post(srv.url + "/inference", json={"prompt": "x", "top_p": 3, "stream_tokens": True},
                      headers=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    r = requests.post(srv.url + "/inference", json={"prompt": "x", "max_tokens": 10**6}, headers=AUTH,
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert requests.post(srv.url + "/inference", json={"prompt": "x"}, timeout=10).status_code == 401


def test_together_request_id_continues(srv):
    rid = f"tg-{uuid.uuid4().hex}"
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    first = requests.post(srv.url + "/inference", json={**body, "request_id": rid}, headers=AUTH, timeout=60)
    so_far = PROMPT + first.json()["choices"][0]["text"]  # the whole conversation, as clients send it
    with requests.post(srv.url + "/inference", json={**body, "prompt": so_far, "request_id": rid,
                                                       "stream_tokens": True},
                       headers=AUTH, stream=True, timeout=60) as second:
        cache = second.headers["X-KV-Cache"]
        events = sse_events(second)
    whole = requests.post(srv.url + "/inference", json={**body, "max_tokens": 24}, headers=AUTH,
                          timeout=60).json()
    assert first.headers["X-KV-Cache"] in ("miss", "partial") and cache == "hit"
    cont = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert whole["usage"]["completion_tokens"] == 24
    assert first.json()["choices"][0]["text"] + cont == whole["choices"][0]["text"]
    assert json.loads(events[-2])["usage"]["cached_tokens"] > 0


# --- generic v1 --------------------------------------------------------------------------------
def run_reader(srv, body: dict) -> dict:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true needs node (>= 18) for the generic v1 reader")
        pytest.skip("node not installed")
    done = subprocess.run([node, str(READER)], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""), "KVBENTO_URL": srv.url, "KVBENTO_KEY": KEY,
                               "KVBENTO_BODY": json.dumps(body)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_generic_v1_node_reader(srv):
    body = {"prompt": "Tell me a story", "maxTokens": 16, "temperature": 0}
    seen = run_reader(srv, body)
    assert seen["status"] == 200 and seen["sawDone"] and not seen["errors"]
    plain = requests.post(srv.url + "/v1/generate", json=body, headers=AUTH, timeout=60).json()
    assert "".join(seen["deltas"]) == plain["text"] == seen["texts"][-1]
    # text is everything so far: each event's text extends the previous one by its delta
    texts, deltas = seen["texts"], seen["deltas"]
    assert all(texts[i] == texts[i - 1] + deltas[i] for i in range(1, len(texts)))
    assert seen["finishReasons"] == [plain["finishReason"]] == ["length"]  # only in the final event
    assert len(set(seen["ids"])) == 1 and seen["ids"][0].startswith("gen_")


def test_generic_v1_sampling_runs_in_node(srv):
    seen = run_reader(srv, {"prompt": "Tell me a story", "maxTokens": 16, "temperature": 0.8})
    assert seen["status"] == 200 and seen["sawDone"] and len(seen["finishReasons"]) == 1


def test_generic_v1_errors(srv):
    seen = run_reader(srv, {"prompt": "x", "maxTokens": 0})
    assert seen["status"] == 400 and seen["errors"][0]["type"] == "invalid_request_error"
    r = requests.post(srv.url + "/v1/generate", json={"prompt": "x", "maxTokens": 10**6}, headers=AUTH,
                      timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "maxTokens"
    r = requests.post(srv.url + "/v1/generate/stream", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and set(r.json()["error"]) >= {"type", "message"}


def test_generic_v1_request_id_continues(srv):
    rid = f"g1-{uuid.uuid4().hex}"
    body = {"prompt": PROMPT, "maxTokens": 8, "temperature": 0, "request_id": rid}
    a = requests.post(srv.url + "/v1/generate", json=body, headers=AUTH, timeout=60)
    b = run_reader(srv, {**body, "prompt": PROMPT + a.json()["text"]})
    whole = requests.post(srv.url + "/v1/generate", headers=AUTH, timeout=60,
                          json={"prompt": PROMPT, "maxTokens": 16, "temperature": 0}).json()
    assert a.headers["X-KV-Cache"] in ("miss", "partial")
    assert a.json()["text"] + "".join(b["deltas"]) == whole["text"]

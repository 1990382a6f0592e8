"""The raw-text dialects against a live `bentoml serve`: Takeoff (/generate, /generate_stream) and
Baseten/Truss (/predict, /v1/models/model:predict), running each seed's sample client code."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest
import requests

pytestmark = [pytest.mark.e2e]

KEY = "truss-dialect-key"
PROMPT = "List 3 things to do in London."  # its greedy output on the tiny model is ASCII (see Truss)


@pytest.fixture(scope="module")
def srv(keyed_server):
    return keyed_server  # KEY is one of its SHARED_KEYS (tests/e2e/conftest.py)


def run_client(code: str, env: dict[str, str] | None = None) -> str:
    """Run a seed's client code in a fresh interpreter; returns its stdout (fails on a non-zero exit)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", **(env or {})})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# --- Takeoff -----------------------------------------------------------------------------------
# takeoff-api.txt's clients send no key: adapted by adding the bearer header this server requires.
TAKEOFF_STREAM = '''
import requests

if __name__ == "__main__":

    input_text = 'List 3 things to do in London.'

    url = "{url}/generate_stream"
    json = {{"text":input_text}}

    response = requests.post(url, json=json, stream=True, headers={{"Authorization": "Bearer {key}"}})
    response.encoding = 'utf-8'

    for text in response.iter_content(chunk_size=1, decode_unicode=True):
        if text:
            print(text, end="", flush=True)
'''

TAKEOFF_JSON = '''
import requests

if __name__ == "__main__":

    input_text = 'List 3 things to do in London.'

    url = "{url}/generate"
    json = {{"text":input_text}}

    response = requests.post(url, json=json, headers={{"Authorization": "Bearer {key}"}})

    if "message" in response.json():
        print(response.json()["message"])
'''


def test_takeoff_seed_clients_print_the_same_text(srv):
    streamed = run_client(TAKEOFF_STREAM.format(url=srv.url, key=KEY))
    whole = run_client(TAKEOFF_JSON.format(url=srv.url, key=KEY))
    assert streamed and whole == streamed + "\n"  # print() adds the newline


def test_takeoff_stream_is_raw_and_token_by_token(srv):
    auth = {"Authorization": f"Bearer {KEY}"}
    with requests.post(srv.url + "/generate_stream", json={"text": PROMPT, "max_new_tokens": 12},
                       headers=auth, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.headers["X-KV-Cache"] == "miss"
        chunks = [c for c in r.iter_content(chunk_size=None) if c]
    body = b"".join(chunks).decode()
    assert not body.startswith("data:") and len(chunks) > 1
    j = requests.post(srv.url + "/generate", json={"text": PROMPT, "max_new_tokens": 12}, headers=auth,
                      timeout=60).json()
    assert j["message"] == body and j["usage"]["completion_tokens"] == 12


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_takeoff_curl_line_streams(srv):
    # The seed's curl line (URL and key adapted).
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", srv.url + "/generate_stream", "-N",
         "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {KEY}",
         "-d", '{"text":"List 3 things to do in London", "max_new_tokens": 8}'],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout and "error" not in out.stdout


def test_takeoff_errors_before_stream(srv):
    r = requests.post(srv.url + "/generate_stream", json={"text": "x", "sampling_topp": 5},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_topp"
    r = requests.post(srv.url + "/generate", json={"text": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# --- Baseten / Truss ---------------------------------------------------------------------------
# baseten-truss-streaming.txt's sample, its elided lines filled in (imports, prompt, the URL in
# `s.post(`). max_new_tokens is 16, not 4096: the tiny model's context is 2048 tokens and a larger
# value is a 400. The sample decodes each single byte as UTF-8, so it only runs on ASCII output.
TRUSS_SEED = '''
import json
import os

import requests

prompt = "List 3 things to do in London."

# Model ID for production deployment
model_id = ""
# Read secrets from environment variables
baseten_api_key = os.environ["BASETEN_API_KEY"]

# Open session to enable streaming
s = requests.Session()
with s.post(
    # Endpoint for production deployment, see API reference for more
    "{url}",
    headers={{"Authorization": f"Api-Key {{baseten_api_key}}"}},
    # Include "stream": True in the data dict so the model knows to stream
    data=json.dumps({{"prompt": prompt, "stream": True, "max_new_tokens": 16}}),
    # Include stream=True as an argument so the requests libray knows to stream
    stream=True,
) as resp:
    resp.raise_for_status()
    # Pass 1 to iter_content() to go a token at a time
    for token in resp.iter_content(1):
        token = token.decode("utf-8")
        # Do something here with each token
        print(token, end="", flush=True)
'''


@pytest.mark.parametrize("path", ["/predict", "/v1/models/model:predict"])
def test_truss_seed_client_streams(srv, path):
    out = run_client(TRUSS_SEED.format(url=srv.url + path), env={"BASETEN_API_KEY": KEY})
    j = requests.post(srv.url + path, json={"prompt": PROMPT, "max_new_tokens": 16},
                      headers={"Authorization": f"Api-Key {KEY}"}, timeout=60).json()
    assert j["output"] and out == j["output"]


def test_truss_auth_and_errors(srv):
    bad = requests.post(srv.url + "/predict", json={"prompt": "x"}, headers={"Authorization": "Api-Key nope"},
                        timeout=10)
    assert bad.status_code == 401
    r = requests.post(srv.url + "/predict", json={"prompt": "x", "max_new_tokens": 10**6, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_new_tokens"


def test_truss_request_id_continues(srv):
    rid = f"truss-{uuid.uuid4().hex}"
    auth = {"Authorization": f"Api-Key {KEY}"}
    body = {"prompt": PROMPT, "max_new_tokens": 6, "request_id": rid}
    a = requests.post(srv.url + "/predict", json=body, headers=auth, timeout=60)
    b = requests.post(srv.url + "/predict", json={**body, "prompt": PROMPT + a.json()["output"], "stream": True},
                      headers=auth, timeout=60)
    whole = requests.post(srv.url + "/predict", json={"prompt": PROMPT, "max_new_tokens": 12}, headers=auth,
                          timeout=60)
    assert a.headers["X-KV-Cache"] in ("miss", "partial") and b.headers["X-KV-Cache"] == "hit"
    assert a.json()["output"] + b.text == whole.json()["output"]

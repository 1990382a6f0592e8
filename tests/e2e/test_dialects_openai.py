"""The OpenAI dialect against a live `bentoml serve`: the official `openai` client on both routes in
both modes, usage / stop / finish_reason / include_usage, error shapes, and request_id continuation."""

from __future__ import annotations

import uuid

import openai
import pytest
import requests

pytestmark = [pytest.mark.e2e]

KEY = "sk-dialects-openai"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def srv(keyed_server):
    return keyed_server  # KEY is one of its SHARED_KEYS (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].object == "model"
    assert models.data[0].id == "kvbento-tiny"  # the directory's name, not the server's path


def test_completions_stream_matches_non_stream(client):
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens == 12 or full.choices[0].finish_reason == "stop"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_uses_template_and_streams_the_same_text(client, srv, tiny_model_dir):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="m", messages=msgs, max_completion_tokens=10, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.object == "chat.completion"
    # The ChatML template wraps each message, so the prompt is longer than the raw words.
    assert full.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # The same prompt as token ids through /v1/completions: the chat route is exactly the template.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    same = requests.post(srv.url + "/v1/completions", headers=AUTH, timeout=60,
                         json={"prompt": ids, "max_tokens": 10, "temperature": 0}).json()
    assert same["choices"][0]["text"] == msg.content


def test_chat_stream_include_usage(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_ends_with_stop(client):
    full = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string")
    cut = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)


def test_seed_makes_sampling_repeatable(client):
    def run() -> str:
        return client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                         seed=1234).choices[0].text
    assert run() == run()


def test_errors_have_openai_shape(client, srv):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=9)
    err = exc.value.body
    assert err["param"] == "n" and "less than or equal to 8" in err["message"]
    assert set(err) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="m", prompt="x", max_tokens=10**6, stream=True)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = requests.post(srv.url + "/v1/completions", headers=AUTH, data=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_request_id_continues_a_cached_sequence(srv):
    """With a request_id the prompt is the whole conversation: sent back with the previous answer,
    the stored sequence (the answer's own token ids included) is reused and generation goes on."""
    rid = f"oa-{uuid.uuid4().hex}"
    url = srv.url + "/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    first = requests.post(url, headers=AUTH, json={**body, "request_id": rid}, timeout=60)
    a = first.json()["choices"][0]["text"]
    second = requests.post(url, headers=AUTH, json={**body, "prompt": PROMPT + a, "request_id": rid}, timeout=60)
    whole = requests.post(url, headers=AUTH, json={**body, "max_tokens": 24}, timeout=60)
    assert first.headers["X-KV-Cache"] in ("miss", "partial") and second.headers["X-KV-Cache"] == "hit"
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == (
        first.json()["usage"]["prompt_tokens"] + 12 - 1)
    b, w = second.json()["choices"][0]["text"], whole.json()["choices"][0]["text"]
    assert whole.json()["usage"]["completion_tokens"] == 24
    assert a + b == w
    # A new message under the same request_id is never dropped: it reaches the model.
    third = requests.post(url, headers=AUTH, json={**body, "prompt": PROMPT + a + b + " More:", "request_id": rid},
                          timeout=60).json()
    assert third["usage"]["prompt_tokens"] > second.json()["usage"]["prompt_tokens"] + 12
    # Without request_id a prompt's full blocks are reused too, with the same output.
    long = {**body, "prompt": PROMPT * 20}  # past one 64-token block
    once = requests.post(url, headers=AUTH, json=long, timeout=60)
    again = requests.post(url, headers=AUTH, json=long, timeout=60)
    assert again.headers["X-KV-Cache"] in ("hit", "partial")
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again.json()["choices"][0]["text"] == once.json()["choices"][0]["text"]


def test_client_disconnect_stops_generation(srv):
    """A stream the client drops is aborted at once: the record keeps only what was delivered."""
    rid = f"oa-drop-{uuid.uuid4().hex}"
    url = srv.url + "/v1/completions"
    with requests.post(url, headers=AUTH, stream=True, timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 1500, "temperature": 0, "stream": True,
                             "request_id": rid}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # three events (each is a data line + a blank line)
    assert sum(1 for g in got if g.startswith(b"data: {")) == 3
    after = requests.post(url, headers=AUTH, timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 2, "request_id": rid, "temperature": 0})
    assert after.status_code == 200 and after.headers["X-KV-Cache"] == "hit"
    # The continuation starts from prompt + the few delivered tokens, far from 1500 generated ones.
    assert after.json()["usage"]["prompt_tokens"] < 200

"""Every dialect's routes in process: the real app over httpx's ASGITransport, with the real tiny model
and a disk store behind it (no `bentoml serve`). Per dialect: a valid request's framing (JSON shape,
SSE events or raw text), a bad parameter's 4xx naming the dialect's own field, and the error shapes
of a refused key and of a body that is not JSON.

ASGITransport hands over a response once the app has finished it, so streams are checked by their
framing and content, not by their timing (the e2e tests see them arrive in chunks)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

KEY = "inprocess-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The lighthouse keeper said"
N = 4  # tokens per answer: min = max, so every answer has exactly N (greedy, no early stop)


def build_app():
    """The app factory, imported in this one place."""
    from server import build_app as factory

    return factory()


@pytest.fixture(scope="session")
def runtime(tiny_model_dir, tmp_path_factory):
    """The runtime as service.py builds it, with an API key so refusals can be checked."""
    from config import Settings
    from server.runtime import Runtime

    settings = Settings(model=str(tiny_model_dir), cache_url=f"disk://{tmp_path_factory.mktemp('kv-routes')}",
                        num_threads=1, cache_block_tokens=8, api_keys=KEY)
    rt = Runtime.start(settings)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def call(runtime, loop):
    """``call(method, path, json=..., headers=...) -> httpx.Response`` against the app, on one event
    loop (the engine's answers are delivered to the loop that asked)."""
    app = build_app()
    app.state.runtime = runtime
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvbento", timeout=120)

    def request(method: str, path: str, *, auth: bool = True, headers: dict | None = None,
                **kw: Any) -> httpx.Response:
        h = {**(AUTH if auth else {}), **(headers or {})}
        return loop.run_until_complete(client.request(method, path, headers=h, **kw))

    yield request
    loop.run_until_complete(client.aclose())


def post(call, path: str, body: dict, **kw: Any) -> httpx.Response:
    return call("POST", path, json=body, **kw)


def ok(r: httpx.Response) -> httpx.Response:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    return r


def sse_data(r: httpx.Response) -> list[str]:
    """The data of each SSE event; every event of the body must be one ``data:`` line."""
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers["content-type"]
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert r.text.endswith("\n\n") and events
    assert all(e.startswith("data: ") and "\n" not in e for e in events), r.text[:500]
    return [e[len("data: "):] for e in events]


def json_events(r: httpx.Response) -> list[dict]:
    data = sse_data(r)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def raw_text(r: httpx.Response) -> str:
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    assert not r.text.startswith("data:") and r.text
    return r.text


def rid() -> str:
    return f"inproc-{uuid.uuid4().hex}"


# --- the request-id API --------------------------------------------------------------------------
def gen_body(request_id: str, stream: bool) -> dict:
    return {"request_id": request_id, "prompt": PROMPT, "stream_response": stream,
            "generation_config": {"do_sample": False, "max_new_tokens": N, "min_new_tokens": N}}


def test_request_id_generate_json_stream_and_continuation(call):
    a = rid()
    first = ok(post(call, "/api/generate", gen_body(a, False)))
    j = first.json()
    assert first.headers["X-KV-Cache"] == "miss" and first.headers["content-type"] == "application/json"
    assert isinstance(j["response"], str) and j["usage"]["completion_tokens"] == N
    streamed = ok(post(call, "/api/generate", gen_body(rid(), True)))
    assert raw_text(streamed) == j["response"]  # the same greedy answer, as raw text
    again = ok(post(call, "/api/generate", gen_body(a, False)))
    assert again.headers["X-KV-Cache"] == "hit" and again.json()["usage"]["cached_tokens"] > 0


def test_request_id_batch_answers_in_order(call):
    ids = [rid(), rid()]
    body = {"prompts": [{"request_id": ids[0], "prompt": "dogs"}, {"request_id": ids[1], "prompt": "cats"}],
            "only_new_tokens": False, "generation_config": {"do_sample": False, "max_new_tokens": N}}
    items = ok(post(call, "/api/generate-batch", body)).json()
    assert [i["request_id"] for i in items] == ids
    assert all(set(i) == {"request_id", "prompt", "response"} for i in items)
    assert items[0]["prompt"] == "dogs" and items[0]["response"].startswith("dogs")
    new_only = ok(post(call, "/api/generate-batch", {**body, "only_new_tokens": True})).json()
    assert [set(i) for i in new_only] == [{"request_id", "response"}] * 2


# --- OpenAI ----------------------------------------------------------------------------------------
def test_openai_completions_json_and_sse(call):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": N, "min_tokens": N, "temperature": 0}
    j = ok(post(call, "/v1/completions", body)).json()
    assert j["object"] == "text_completion" and j["id"] and j["choices"][0]["index"] == 0
    assert j["choices"][0]["finish_reason"] == "length" and j["usage"]["completion_tokens"] == N
    assert j["usage"]["total_tokens"] == j["usage"]["prompt_tokens"] + N
    events = json_events(ok(post(call, "/v1/completions", {**body, "stream": True,
                                                            "stream_options": {"include_usage": True}})))
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == j["choices"][0]["text"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == N
    assert all(e.get("usage") is None for e in events[:-1])


def test_openai_chat_json_and_sse(call):
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}],
            "max_completion_tokens": N, "temperature": 0}
    j = ok(post(call, "/v1/chat/completions", body)).json()
    msg = j["choices"][0]["message"]
    assert j["object"] == "chat.completion" and msg["role"] == "assistant" and isinstance(msg["content"], str)
    events = json_events(ok(post(call, "/v1/chat/completions", {**body, "stream": True})))
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == msg["content"]
    assert events[-1]["choices"][0]["finish_reason"] == j["choices"][0]["finish_reason"]


# --- Takeoff -----------------------------------------------------------------------------------------
def test_takeoff_json_and_raw_stream(call):
    body = {"text": PROMPT, "max_new_tokens": N, "min_new_tokens": N}
    j = ok(post(call, "/generate", body)).json()
    assert isinstance(j["message"], str) and j["usage"]["completion_tokens"] == N
    assert raw_text(ok(post(call, "/generate_stream", body))) == j["message"]


# --- Together ----------------------------------------------------------------------------------------
def test_together_json_and_sse(call):
    body = {"model": "any", "prompt": PROMPT, "max_tokens": N, "temperature": 0}
    j = ok(post(call, "/inference", body)).json()
    assert j["choices"][0]["text"] == j["output"]["choices"][0]["text"]
    events = json_events(ok(post(call, "/inference", {**body, "stream_tokens": True})))
    assert all(e["result_type"] == "language-model-inference" and e["id"] == events[0]["id"] for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == j["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == j["choices"][0]["finish_reason"]


# --- Baseten / Truss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/predict", "/v1/models/model:predict"])
def test_truss_json_and_raw_stream(call, path):
    body = {"prompt": PROMPT, "max_new_tokens": N}
    api_key = {"Authorization": f"Api-Key {KEY}"}  # Baseten's scheme; Bearer is taken too
    j = ok(post(call, path, body, auth=False, headers=api_key)).json()
    assert isinstance(j["output"], str) and j["output"]
    assert raw_text(ok(post(call, path, {**body, "stream": True}))) == j["output"]


# --- generic v1 --------------------------------------------------------------------------------------
def test_generic_v1_json_and_sse(call):
    body = {"prompt": PROMPT, "maxTokens": N, "temperature": 0}
    j = ok(post(call, "/v1/generate", body)).json()
    assert j["finishReason"] == "length" and isinstance(j["text"], str)
    events = json_events(ok(post(call, "/v1/generate/stream", body)))
    texts, deltas = [e["text"] for e in events], [e["delta"] for e in events]
    assert "".join(deltas) == texts[-1] == j["text"]
    assert all(texts[i] == texts[i - 1] + deltas[i] for i in range(1, len(texts)))  # text is all so far
    assert [e.get("finishReason") for e in events if e.get("finishReason")] == ["length"]
    assert events[-1]["finishReason"] == "length"
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("gen_")


# --- Responses ---------------------------------------------------------------------------------------
def test_responses_json_and_named_events(call):
    body = {"model": "m", "input": PROMPT, "max_output_tokens": N, "temperature": 0}
    j = ok(post(call, "/v1/responses", body)).json()
    assert j["object"] == "response" and j["id"].startswith("resp")
    text = j["output"][0]["content"][0]["text"]
    assert j["output"][0]["role"] == "assistant" and j["status"] in ("completed", "incomplete")
    r = ok(post(call, "/v1/responses", {**body, "stream": True}))
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    events = []
    for b in blocks:  # each event: "event: <type>" then "data: <json of that type>"
        name, data = b.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: "):])
        assert event["type"] == name[len("event: "):]
        events.append(event)
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == f"response.{j['status']}" and "[DONE]" not in r.text
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text


# --- bad parameters: 4xx naming the dialect's own field ----------------------------------------------
def _gc(**cfg) -> dict:
    return {"request_id": "bad-param", "prompt": "p", "generation_config": cfg}


BAD_PARAMS = [
    ("/api/generate", _gc(top_p=1.5), "generation_config.top_p"),
    # The range check past the body model (the model's context) names the body's field path too.
    ("/api/generate", _gc(max_new_tokens=10**9), "generation_config.max_new_tokens"),
    ("/api/generate-batch", {"prompts": [{"request_id": "b1", "prompt": "p"}],
                             "generation_config": {"num_beams": 0}}, "generation_config.num_beams"),
    ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ("/v1/completions", {"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ("/generate", {"text": "x", "sampling_topp": 5}, "sampling_topp"),
    ("/generate_stream", {"text": "x", "sampling_topp": 5}, "sampling_topp"),
    ("/inference", {"prompt": "x", "top_p": 3, "stream_tokens": True}, "top_p"),
    ("/inference", {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ("/predict", {"prompt": "x", "max_new_tokens": 10**6, "stream": True}, "max_new_tokens"),
    ("/v1/models/model:predict", {"prompt": "x", "max_new_tokens": 10**6}, "max_new_tokens"),
    ("/v1/generate", {"prompt": "x", "maxTokens": 10**6}, "maxTokens"),
    ("/v1/generate/stream", {"prompt": "x", "maxTokens": 0}, "maxTokens"),
    ("/v1/responses", {"model": "m", "input": "x", "temperature": 2.5}, "temperature"),
    ("/v1/responses", {"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
]
OPENAI_SHAPE = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


@pytest.mark.parametrize("path, body, param", BAD_PARAMS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_parameter_is_a_4xx_naming_the_dialects_field(call, path, body, param):
    r = post(call, path, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/json"  # refused before any stream starts
    err = r.json()["error"]
    assert err["param"] == param and param.rsplit(".", 1)[-1] in err["message"], err
    assert err["type"] == "invalid_request_error"
    if path in OPENAI_SHAPE:
        assert set(err) == {"message", "type", "param", "code"} and err["code"]


# --- error shapes: a refused key, a body that is not JSON --------------------------------------------
PATHS = ["/api/generate", "/api/generate-batch", "/v1/completions", "/v1/chat/completions", "/generate",
         "/generate_stream", "/inference", "/predict", "/v1/models/model:predict", "/v1/generate",
         "/v1/generate/stream", "/v1/responses"]


def check_shape(path: str, err: dict) -> None:
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if path in OPENAI_SHAPE:
        assert set(err) == {"message", "type", "param", "code"}
    else:
        assert set(err) <= {"message", "type", "param"}


@pytest.mark.parametrize("path", PATHS)
def test_refused_key_is_401_in_the_dialects_shape(call, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = call("POST", path, auth=False, headers=headers, json={"prompt": "x"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error"
        check_shape(path, err)


@pytest.mark.parametrize("path", PATHS)
def test_body_that_is_not_json_is_400_in_the_dialects_shape(call, path):
    r = call("POST", path, content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "JSON" in err["message"]
    check_shape(path, err)


def test_health_names_the_dtype_its_reason_and_the_kernels(call, runtime):
    from model import precision

    body = call("GET", "/health", auth=False).json()
    choice = precision.pick(runtime.model.device, runtime.settings.dtype)  # auto unless KVBENTO_DTYPE is set
    assert body["status"] == "ok" and body["device"] == "cpu"
    assert (body["dtype"], body["dtype_reason"]) == (choice.name, choice.reason)
    assert body["kernels"] == runtime.model.kernels
    assert set(body["kernels"]) == {"linears", "attention", "decode_step", "batch_invariant"}

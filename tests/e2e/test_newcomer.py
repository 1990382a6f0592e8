"""What a newcomer meets on a real `bentoml serve`: the served model name is the model's name (or
KVBENTO_MODEL_NAME), never a path on the server's disk; unknown fields are refused with a 400 naming
them; errors name the field as the client sent it; and every error a route, the framework or
BentoML answers (404, 405, 413, 415) is JSON in the dialect's shape."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.e2e

NAME = "acme/tiny-chat"


@pytest.fixture(scope="module")
def srv(tuned_server):
    return tuned_server  # KVBENTO_MODEL_NAME is NAME there


def post(srv, path: str, body: dict) -> dict:
    r = requests.post(srv.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_answer_names_the_model_not_its_path(srv, tiny_model_dir):
    seen = {
        "models": requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"],
        "health": requests.get(srv.url + "/health", timeout=30).json()["model"],
        "chat": post(srv, "/v1/chat/completions", {"model": "x", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})["model"],
        "completions": post(srv, "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 2})["model"],
        "responses": post(srv, "/v1/responses", {"model": "x", "input": "hi", "max_output_tokens": 2})["model"],
        # Together's answer says which model served it, whatever the client named.
        "together": post(srv, "/inference", {"model": "other/model", "prompt": "hi", "max_tokens": 2})["model"],
    }
    post(srv, "/api/generate", {"request_id": "name-1", "prompt": "hi", "stream_response": False,
                                "generation_config": {"max_new_tokens": 2}})
    seen["record"] = requests.get(srv.url + "/api/cache/name-1", timeout=30).json()["model"]
    assert seen == dict.fromkeys(seen, NAME)



OPENAI_SHAPE = {"message", "type", "param", "code"}


def error_of(r: requests.Response, status: int, shape: set[str] | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    err = r.json()["error"]
    assert {"type", "message"} <= set(err) and "detail" not in r.json()
    if shape:
        assert set(err) == shape, err
    return err


@pytest.mark.parametrize("path, body, field", [
    # The findings of issue 24: a top-level max_new_tokens was dropped (128 tokens came back).
    ("/api/generate", {"request_id": "u-1", "prompt": "hi", "max_new_tokens": 3}, "max_new_tokens"),
    ("/api/generate-batch", {"prompts": [{"request_id": "u-2", "prompt": "x", "n": 1}]}, "prompts.0.n"),
    ("/generate", {"text": "hi", "prompt": "hi"}, "prompt"),
    ("/inference", {"prompt": "hi", "max_new_tokens": 3}, "max_new_tokens"),
    ("/predict", {"prompt": "hi", "maxTokens": 3}, "maxTokens"),
    ("/v1/generate", {"prompt": "hi", "max_tokens": 3}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_new_tokens": 3}, "max_new_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "messages.0.weight"),
    ("/v1/responses", {"input": "hi", "max_tokens": 3}, "max_tokens"),
])
def test_unknown_fields_are_refused_by_name(srv, path, body, field):
    err = error_of(requests.post(srv.url + path, json=body, timeout=30), 400)
    assert err["param"] == field and err["message"].startswith(f"{field}: unknown field"), err


def test_errors_name_the_field_the_client_sent(srv):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    err = error_of(requests.post(srv.url + "/v1/chat/completions", json={**chat, "max_tokens": 1e9}, timeout=30),
                   400, OPENAI_SHAPE)
    assert err["param"] == "max_tokens" and err["message"].startswith("max_tokens "), err
    err = error_of(requests.post(srv.url + "/v1/chat/completions", json={**chat, "max_completion_tokens": 1e9},
                                 timeout=30), 400, OPENAI_SHAPE)
    assert err["param"] == "max_completion_tokens", err
    err = error_of(requests.post(srv.url + "/predict", json={"prompt": "hi", "max_tokens": 10**9}, timeout=30), 400)
    assert err["param"] == "max_tokens", err


@pytest.mark.parametrize("method, path, status, shape", [
    ("GET", "/no/such/route", 404, None),
    ("GET", "/v1/no/such/route", 404, OPENAI_SHAPE),
    ("GET", "/v1/chat/completions", 405, OPENAI_SHAPE),
    ("PUT", "/v1/responses", 405, OPENAI_SHAPE),
    ("GET", "/api/generate", 405, None),
    ("GET", "/generate_stream", 405, None),
    ("GET", "/bentoml/generate", 405, None),  # one of BentoML's own routes
    ("POST", "/readyz", 405, None),
    ("DELETE", "/v1/models", 405, OPENAI_SHAPE),
])
def test_routing_errors_are_json(srv, method, path, status, shape):
    err = error_of(requests.request(method, srv.url + path, timeout=30), status, shape)
    assert path in err["message"]


@pytest.mark.parametrize("path, shape", [("/api/generate", None), ("/v1/chat/completions", OPENAI_SHAPE)])
def test_body_limits_are_json_in_the_dialect_shape(srv, path, shape):
    big = b'{"prompt": "' + b"x" * (5 << 20) + b'"}'
    error_of(requests.post(srv.url + path, data=big, headers={"Content-Type": "application/json"}, timeout=60),
             413, shape)
    error_of(requests.post(srv.url + path, data=b"<a/>", headers={"Content-Type": "application/xml"}, timeout=30),
             415, shape)

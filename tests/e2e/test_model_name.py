"""The served model name is the model's name (or KVBENTO_MODEL_NAME), never a path on the server's
disk: in /v1/models, /health, every answer that names a model, and cache records."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.e2e

NAME = "acme/tiny-chat"


@pytest.fixture(scope="module")
def srv(server_factory):
    return server_factory({"KVBENTO_MODEL_NAME": NAME})


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


"""The OpenAPI documents: every POST route declares its body and answers with an example, the
document validates, and every example is a request the server answers with 200."""

from __future__ import annotations

import pytest
import requests
from openapi_spec_validator import validate

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def spec(server) -> dict:
    r = requests.get(server.url + "/api/openapi.json", timeout=10)
    assert r.status_code == 200
    return r.json()


BODYLESS = {"/api/stop/{request_id}", "/v1/responses/{response_id}/cancel"}  # POST routes that take no body


def _posts(doc: dict) -> dict[str, dict]:
    return {path: item["post"] for path, item in doc["paths"].items() if "post" in item and path not in BODYLESS}


def test_the_document_validates(spec):
    validate(spec)  # raises on any schema violation


def test_every_post_route_declares_body_answers_and_example(spec):
    posts = _posts(spec)
    assert {"/api/generate", "/api/generate-batch", "/v1/completions", "/v1/chat/completions", "/generate",
            "/generate_stream", "/inference", "/predict", "/v1/models/model:predict", "/v1/generate",
            "/v1/generate/stream"} <= set(posts)
    for path, op in posts.items():
        body = op["requestBody"]["content"]["application/json"]
        assert body["schema"]["type"] == "object" and body["schema"]["properties"], path
        assert isinstance(body["example"], dict), path
        assert "example" in next(iter(op["responses"]["200"]["content"].values())), path
        assert "400" in op["responses"], path
    # Constraints of the body models are visible to clients.
    n = posts["/v1/completions"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["n"]
    assert n["maximum"] == 8
    gc = posts["/api/generate"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "top_p" in gc["generation_config"]["properties"]  # nested models are inlined, not dangling $refs


def test_every_example_is_a_working_request(spec, server):
    for path, op in _posts(spec).items():
        example = op["requestBody"]["content"]["application/json"]["example"]
        r = requests.post(server.url + path, json=example, timeout=120)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])


def test_bentoml_docs_page_sees_bodies_and_typed_apis(server):
    docs = requests.get(server.url + "/docs.json", timeout=10).json()
    posts = _posts(docs)
    assert {"/bentoml/generate", "/bentoml/generate_stream", "/bentoml/generate_batch"} <= set(posts)
    for path in ("/api/generate", "/v1/chat/completions", "/inference"):
        assert posts[path]["requestBody"]["content"]["application/json"]["example"], path
    assert "/health" in docs["paths"]

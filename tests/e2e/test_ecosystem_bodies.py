"""Bodies of any shape get a 4xx in the dialect's error shape on every POST route of a live server."""

from __future__ import annotations

import pytest
import requests

pytestmark = [pytest.mark.e2e]

ROUTES = ["/api/generate", "/api/generate-batch", "/v1/completions", "/v1/chat/completions", "/generate",
          "/generate_stream", "/inference", "/predict", "/v1/models/model:predict", "/v1/generate",
          "/v1/generate/stream"]
DEEP = b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
LONG = b'{"prompt": [' + b"0," * (1 << 20) + b"0]}"


def _is_error_shape(r: requests.Response) -> bool:
    body = r.json()
    return isinstance(body.get("error"), dict) and body["error"].get("message")


@pytest.mark.parametrize("route", ROUTES)
def test_any_body_is_a_4xx(server, route):
    url = server.url + route
    cases = [
        (DEEP, "application/json", 400, "nested deeper"),
        (LONG, "application/json", 400, "array of"),
        (b'{"prompt": "caf\xe9 \xff"}', "application/json", 400, "not UTF-8"),
        (b'{"prompt": "\\ud800"}', "application/json", 400, "surrogate"),
        (b'{"prompt": "x"}', "application/xml", 415, "Content-Type"),
        (b'{"prompt": "x"}', "multipart/form-data; boundary=b", 415, "Content-Type"),
        (b'{"prompt": "x"}', "application/json; charset=latin-1", 415, "charset"),
    ]
    for raw, ctype, status, words in cases:
        r = requests.post(url, data=raw, headers={"Content-Type": ctype}, timeout=60)
        assert r.status_code == status, (route, words, r.status_code, r.text[:200])
        assert _is_error_shape(r) and words in r.json()["error"]["message"], (route, r.text[:200])


def test_bentoml_api_routes_refuse_bad_bodies_without_500(server):
    for raw in (b'{"request_id": "a", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"prompt": "\xff"}',
                b'{"request_id": 1}'):
        r = requests.post(server.url + "/bentoml/generate", data=raw, headers={"Content-Type": "application/json"},
                          timeout=60)
        assert 400 <= r.status_code < 500, (raw[:40], r.status_code, r.text[:200])

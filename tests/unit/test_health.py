"""/health answers 503 with the JSON error shape until the runtime is there, and once shutdown began."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi.testclient import TestClient

from server import build_app


def test_loading_and_shutting_down_are_503():
    app = build_app()
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503
        assert r.json() == {"error": {"type": "unavailable_error", "message": "the model is loading"}}
        app.state.runtime = SimpleNamespace(is_closing=True)  # the flag Runtime.close() sets first
        r = client.get("/health")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]

"""What wraps the whole server, BentoML's own routes included: the docs page at ``/`` and the JSON
shape of the HTTP errors no route answers itself.

BentoML's stock page at ``/`` loads Google Tag Manager from the internet; ours is the same Swagger
UI from the bundle's files, and its Content-Security-Policy lets nothing else load. Routing errors
(an unknown path: 404, a wrong method: 405) and the framework's 413 / 415 / 422 come from Starlette,
FastAPI or BentoML as plain text or ``{"detail": ...}``; they leave here in the error shape of the
dialect that owns the path (the server's generic shape elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from functools import cache
from pathlib import Path
from typing import Any

from model.types import ServingError
from protocol import openai
from protocol.common import error_body
from protocol.dialects import DIALECTS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

PAGE = Path(__file__).resolve().parent / "static" / "docs.html"
CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'")
# The statuses the framework answers by itself (routing, body limits, validation).
REWRITTEN = {404: "not_found_error", 405: "invalid_request_error", 413: "payload_too_large",
             415: "unsupported_media_type", 422: "invalid_request_error"}


@cache
def _page() -> bytes:
    return PAGE.read_bytes()


@cache
def _shapes() -> dict[str, Callable[[ServingError], dict[str, Any]]]:
    return {route.path: spec.error_body for spec in DIALECTS for route in spec.routes}


def shape_of(path: str) -> Callable[[ServingError], dict[str, Any]]:
    """The error shape of ``path``: its dialect's, OpenAI's under /v1/ (models, stored responses),
    else the server's generic one."""
    own = _shapes().get(path)
    if own is not None:
        return own
    return openai.error_body if path.startswith("/v1/") else error_body


def _message(status: int, scope: Scope, raw: bytes, allow: str | None) -> str:
    method, path = scope.get("method", "GET"), scope.get("path", "/")
    if status == 404:
        return f"{method} {path}: no such route"
    if status == 405:
        return f"{method} is not allowed on {path}" + (f": use {allow}" if allow else "")
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        detail = raw.decode("utf-8", "replace").strip()
    return str(detail or f"HTTP {status}")


def _is_json_error(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw).get("error"), (dict, str))
    except (ValueError, AttributeError):
        return False


class Front:
    """ASGI middleware around the whole service (``Service.add_asgi_middleware``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            return await self._docs(scope, send)
        held: list[Message] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REWRITTEN:
                held.append(message)
                return
            if held and message["type"] == "http.response.body":
                held.append(message)
                if not message.get("more_body"):
                    await self._rewrite(scope, held, send)
                return
            await send(message)

        await self.app(scope, receive, watch)

    async def _rewrite(self, scope: Scope, held: list[Message], send) -> None:
        start, raw = held[0], b"".join(m.get("body", b"") for m in held[1:])
        headers = [(k, v) for k, v in start.get("headers", [])
                   if k.lower() not in (b"content-type", b"content-length")]
        if _is_json_error(raw):  # a route's own error: already in its shape
            body = raw
        else:
            status = start["status"]
            allow = next((v.decode() for k, v in headers if k.lower() == b"allow"), None)
            exc = ServingError(_message(status, scope, raw, allow))
            exc.type = REWRITTEN[status]
            body = json.dumps(shape_of(scope["path"])(exc), separators=(",", ":")).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": start["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _docs(self, scope: Scope, send) -> None:
        body = _page()
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-cache"), (b"content-security-policy", CSP.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})

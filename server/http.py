"""HTTP helpers shared by the routers: bounded body reading, auth, JSON errors, streaming."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from model.types import ServingError, QueueFull
from protocol.common import PayloadTooLarge, check_content_type, error_body, parse_json
from server.runtime import Runtime

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("kvbento.http")
# The request_id as a header, so a load balancer can hash a conversation to one replica without
# reading bodies. The body's request_id, when present, must agree with it.
REQUEST_ID_HEADER = "X-KV-Request-Id"


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def read_body(request: Request, model: type[M]) -> M:
    """Read at most KVBENTO_MAX_BODY_BYTES of a JSON body and validate it as ``model``.

    Raises:
        UnsupportedMediaType: a Content-Type naming another format (415).
        PayloadTooLarge: the body is over the limit (413).
        BodyError: see ``parse_json`` (400).
    """
    check_content_type(request.headers.get("content-type"))
    limit = runtime(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes, the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    rid = request.headers.get(REQUEST_ID_HEADER)
    # Bodies without a top-level request_id (the batch route) take the header as a routing key only.
    fallbacks = {"request_id": rid} if rid is not None and "request_id" in model.model_fields else None
    return parse_json(b"".join(chunks), model, fallbacks)


def authenticate(request: Request) -> str:
    """The caller's tenant; raises Unauthorized when keys are configured and not met."""
    return runtime(request).tenant(request.headers.get("authorization"))


# Error kinds (model/types.py, session/errors.py, protocol/common.py) -> HTTP status.
STATUS = {"invalid": 400, "unauthorized": 401, "not_found": 404, "busy": 409, "conflict": 409, "too_large": 413,
          "unsupported_media_type": 415, "overloaded": 429, "internal": 500, "unavailable": 503}


def http_status(exc: ServingError) -> int:
    return STATUS.get(exc.kind, 500)


def error_response(exc: ServingError, shape: Callable[[ServingError], Any] = error_body) -> JSONResponse:
    headers = {}
    if isinstance(exc, QueueFull):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.kind == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(shape(exc), status_code=http_status(exc), headers=headers)


def stream(body: AsyncIterator[bytes], media_type: str, headers: dict[str, str] | None = None) -> StreamingResponse:
    """A streaming answer that is never buffered by proxies."""
    h = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    h.update(headers or {})
    return StreamingResponse(body, media_type=media_type, headers=h)

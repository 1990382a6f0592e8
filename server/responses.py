"""The Responses API's stored objects: retrieve (a background response: with the output so far, or
its events streamed from ``starting_after``), cancel, delete, list input items (POST
/v1/responses is the protocol spec, served by server/dialects.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import ServingError
from session.errors import NotFound
from protocol import responses as rs
from protocol import responses_events as rev
from protocol import responses_background as rb
from protocol.common import BodyError
from server.http import authenticate, error_response, runtime, stream
from session import responses as stored

router = APIRouter()


def _page_query(request: Request) -> tuple[str | None, int, str]:
    """``after``, ``limit`` (1-100, default 20) and ``order`` (default desc), as OpenAI pages lists."""
    q = request.query_params
    raw = q.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise BodyError(f"limit: must be an integer between 1 and 100, got {raw!r}", param="limit")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BodyError(f"order: must be 'asc' or 'desc', got {order!r}", param="order")
    return q.get("after") or None, int(raw), order


async def _load(request: Request, response_id: str) -> stored.StoredResponse:
    rt = runtime(request)
    tenant = authenticate(request)
    rec = await stored.ResponseStore(rt.store).load(tenant, response_id)
    if rec is None:
        raise NotFound(f"no stored response {response_id!r}", param="response_id")
    return rec


def _starting_after(request: Request) -> int:
    """The ``starting_after`` query parameter, -1 when absent (replay from the first event)."""
    raw = request.query_params.get("starting_after")
    if raw is None:
        return -1
    if not raw.isdigit():
        raise BodyError(f"starting_after: must be a sequence number (an integer >= 0), got {raw!r}",
                        param="starting_after")
    return int(raw)


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise BodyError(f"{name}: must be true or false, got {raw!r}", param=name)
    return raw in ("true", "1")


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str):
    rt = runtime(request)
    try:
        is_stream, after = _flag(request, "stream"), _starting_after(request)
        if "starting_after" in request.query_params and not is_stream:
            raise BodyError("starting_after: only with stream=true", param="starting_after")
        rec = await _load(request, response_id)
        tenant = authenticate(request)
        items = await rt.background.events_so_far(tenant, response_id)
        if not is_stream:
            return JSONResponse(rb.progress(rec.response, items))
        if not rec.response.get("background"):
            raise BodyError("stream: only a background response's events can be streamed again", param="stream")
        # A job whose runner has not written its first events yet has none so far: follow from the start.
        items = items or []
        num_events = len(items) - (1 if items and "end" in items[-1] else 0)
        if after >= num_events:
            raise BodyError(f"starting_after: {after} is beyond the last event ({num_events - 1})",
                            param="starting_after")
    except ServingError as exc:
        return error_response(exc, rs.error_body)
    events = rt.background.follow(tenant, response_id, after)
    return stream((rev.sse_event(e) async for e in events), "text/event-stream")


@router.post("/v1/responses/{response_id}/cancel")
async def cancel(request: Request, response_id: str):
    """Cancel a background response from any replica: its runner stops at its next write and
    the record keeps the output so far. A finished one is a 400 (as OpenAI answers); a cancelled
    one is answered as it is."""
    rt = runtime(request)
    try:
        rec = await _load(request, response_id)
        tenant = authenticate(request)
        status = rec.response.get("status")
        if not rec.response.get("background"):
            raise BodyError("only a background response can be cancelled", param="response_id")
        if status in ("completed", "incomplete", "failed"):
            raise BodyError(f"cannot cancel a {status} response", param="response_id")
        if status != "cancelled":
            await rt.background.cancel(tenant, response_id)  # its runner writes the record
            rec = await _load(request, response_id)
    except ServingError as exc:
        return error_response(exc, rs.error_body)
    return JSONResponse(rec.response)


@router.delete("/v1/responses/{response_id}")
async def delete(request: Request, response_id: str):
    try:
        tenant = authenticate(request)
        existed = await stored.ResponseStore(runtime(request).store).delete(tenant, response_id)
        if not existed:
            raise NotFound(f"no stored response {response_id!r}", param="response_id")
    except ServingError as exc:
        return error_response(exc, rs.error_body)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(request: Request, response_id: str):
    try:
        after, limit, order = _page_query(request)
        rec = await _load(request, response_id)
        page = rs.list_items(rec.input_items, after, limit, order)
    except ServingError as exc:
        return error_response(exc, rs.error_body)
    return JSONResponse(page)

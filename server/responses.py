"""The Responses API's stored objects: retrieve, delete, list input items (POST /v1/responses is the
protocol spec, served by server/dialects.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import ServingError
from session.errors import NotFound
from protocol import responses as rs
from protocol.common import BodyError
from server.http import authenticate, error_response, runtime
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


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str):
    try:
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

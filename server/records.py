"""The request-id API's record endpoints: GET and DELETE /api/cache/{request_id}, and stopping a
running generation by its request_id (POST /api/stop/{request_id})."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cache.base import BackendUnavailable
from session.errors import NotFound, StoreUnavailable
from server.http import authenticate, runtime

router = APIRouter()


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


async def _on_record(request: Request, request_id: str, verb: str):
    """The store's ``verb`` (info, delete) on the caller's record; 404 when it has none, 503 when
    the store cannot answer."""
    rt = runtime(request)
    tenant = authenticate(request)
    try:
        found = await getattr(rt.store, verb)(tenant, request_id)
    except BackendUnavailable:
        raise StoreUnavailable() from None
    if not found:
        raise NotFound(f"no cache record for request_id {request_id!r}", param="request_id")
    return rt, found


@router.get("/api/cache/{request_id}")
async def cache_info(request: Request, request_id: str):
    rt, info = await _on_record(request, request_id, "info")
    return JSONResponse(
        {
            "request_id": request_id,
            "tokens": info.num_tokens,
            "prompt_tokens": info.num_prompt_tokens,
            "bytes": info.nbytes,
            "head_bytes": info.head_nbytes,
            "blocks": info.num_blocks,
            "model": rt.settings.served_model_name,
            "fingerprint": info.fingerprint,
            "fingerprint_matches": info.fingerprint == rt.model.fingerprint,
            "created_at": _iso(info.created_at),
            "last_used_at": _iso(info.last_used_at),
            "expires_at": _iso(info.expires_at),
        },
        headers={"X-KV-Cache": "hit"},
    )


@router.post("/api/stop/{request_id}")
async def stop(request: Request, request_id: str):
    """Stop the generation running under ``request_id`` on this replica: its stream ends at the next
    step with every token generated so far, which the record keeps. ``stopped`` is false when none
    runs here (already finished, or on another replica)."""
    rt = runtime(request)
    tenant = authenticate(request)
    return JSONResponse({"request_id": request_id, "stopped": rt.session.stop(tenant, request_id)})


@router.delete("/api/cache/{request_id}")
async def cache_delete(request: Request, request_id: str):
    await _on_record(request, request_id, "delete")
    return Response(status_code=204)

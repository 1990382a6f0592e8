"""The playground page (GET /playground) and the cache list it shows (GET /api/cache)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from cache.base import BackendUnavailable
from session.errors import StoreUnavailable
from protocol.common import MAX_REQUEST_ID_CHARS, REQUEST_ID_CHARS, BodyError
from server.http import authenticate, runtime

router = APIRouter()

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"
# The page is one file with its script and style inline: nothing else may load (no CDN), and it
# talks only to this server.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'")
MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 4096
# A prefix of a request_id: the request_id rules (no whitespace or slashes), possibly empty.
_PREFIX = re.compile(rf"^{REQUEST_ID_CHARS}{{0,{MAX_REQUEST_ID_CHARS}}}$")


@cache
def _page() -> bytes:
    return PAGE.read_bytes()


@router.get("/playground", include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP})


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def _query(request: Request) -> tuple[str, int, str | None]:
    """prefix, limit and cursor of a list request, each checked (a 400 names the field)."""
    q = request.query_params
    unknown = sorted(set(q) - {"prefix", "limit", "cursor"})
    if unknown:
        raise BodyError(f"{unknown[0]}: unknown query parameter (use prefix, limit, cursor)",
                        param=unknown[0])
    prefix = q.get("prefix", "")
    if not _PREFIX.match(prefix):
        raise BodyError("prefix: at most 256 characters, no whitespace or slashes", param="prefix")
    raw = q.get("limit", "100")
    if not re.fullmatch(r"\d{1,7}", raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BodyError(f"limit: an integer from 1 to {MAX_LIMIT}, got {raw!r}", param="limit")
    cursor = q.get("cursor") or None
    if cursor is not None and len(cursor) > MAX_CURSOR_CHARS:
        raise BodyError(f"cursor: longer than {MAX_CURSOR_CHARS} characters", param="cursor")
    return prefix, int(raw), cursor


@router.get("/api/cache")
async def cache_list(request: Request) -> JSONResponse:
    """This tenant's request_ids, in pages: ``{"data": [...], "next_cursor": str | None}``."""
    tenant = authenticate(request)
    prefix, limit, cursor = _query(request)
    store = runtime(request).store
    try:
        page, next_cursor = await store.list_heads(tenant, prefix, limit, cursor)
    except BackendUnavailable:
        raise StoreUnavailable() from None
    except ValueError as exc:
        raise BodyError(f"cursor: {exc}", param="cursor") from None
    data = [{"request_id": h.request_id, "tokens": h.num_tokens, "bytes": h.nbytes,
             "head_bytes": h.head_nbytes, "blocks": h.num_blocks,
             "created_at": _iso(h.created_at), "last_used_at": _iso(h.last_used_at),
             "expires_at": _iso(h.expires_at)} for h in page]
    return JSONResponse({"object": "list", "data": data, "next_cursor": next_cursor})

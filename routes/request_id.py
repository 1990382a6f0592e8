"""Routes of the request-id cache API: generate, generate-batch, and the cache record endpoints."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cache.base import BackendUnavailable
from model.engine import RequestStream
from model.types import EngineClosed
from protocol.adapter import pump
from protocol.common import BodyError, NotFound
from protocol.request_id import BatchBody, GenerateBody, batch_item, from_engine, to_engine
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import authenticate, read_body, runtime, stream

router = APIRouter()


def _error_line(kind: str, message: str) -> bytes:
    return ("\n" + json.dumps({"error": {"type": kind, "message": message}}) + "\n").encode()


async def _text_stream(request: Request, s: RequestStream, only_new_tokens: bool) -> AsyncIterator[bytes]:
    if not only_new_tokens:
        yield runtime(request).engine.decode(s.base_token_ids).encode()
    async for frame in pump(s, lambda d: d.text.encode() if d.text else None,
                            lambda message: _error_line("internal_error", message), cancel=s.cancel):
        yield frame


@router.post("/api/generate", **post_doc(
    GenerateBody,
    {"request_id": "chat-42", "prompt": "[INST] Write a poem about cats [/INST]\n\n", "only_new_tokens": True,
     "stream_response": False, "generation_config": {"do_sample": False, "max_new_tokens": 16}},
    json_answer({"request_id": "chat-42", "response": "Soft paws ...", "finish_reason": "length",
                 "usage": {"prompt_tokens": 20, "completion_tokens": 16, "cached_tokens": 0}},
                "JSON with stream_response false; streamed text/plain otherwise"),
    stream_answer("text/plain", "Soft paws ...")))
async def generate(request: Request):
    rt = runtime(request)
    tenant = authenticate(request)
    body = await read_body(request, GenerateBody)
    req = to_engine(body.request_id, body.prompt, body.generation_config, rt.settings.generation_defaults(), tenant,
                    append=body.append, parent_request_id=body.parent_request_id)
    s = await rt.session.generate(req)
    headers = {"X-KV-Cache": s.cache_status.value}
    if body.stream_response:
        return stream(_text_stream(request, s, body.only_new_tokens), "text/plain; charset=utf-8", headers)
    await s.collect()
    full = rt.engine.decode(s.token_ids) if not body.only_new_tokens else ""
    return JSONResponse(from_engine(s, body.only_new_tokens, full), headers=headers)


@router.post("/api/generate-batch", **post_doc(
    BatchBody,
    {"prompts": [{"request_id": "a", "prompt": "cats"}, {"request_id": "b", "prompt": "dogs"}],
     "only_new_tokens": True, "generation_config": {"max_new_tokens": 16}},
    json_answer([{"request_id": "a", "response": "..."}, {"request_id": "b", "response": "..."}],
                "One item per prompt, in their order")))
async def generate_batch(request: Request):
    rt = runtime(request)
    tenant = authenticate(request)
    body = await read_body(request, BatchBody)
    ids = [p.request_id for p in body.prompts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise BodyError(f"prompts: request_id {dupes[0]!r} appears more than once", param="prompts")
    defaults = rt.settings.generation_defaults()
    started = await asyncio.gather(
        *(rt.session.generate(to_engine(p.request_id, p.prompt, body.generation_config, defaults, tenant))
          for p in body.prompts),
        return_exceptions=True,
    )
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for r in started:
            if isinstance(r, RequestStream):
                r.cancel()
        raise failed[0]
    await asyncio.gather(*(s.collect() for s in started))
    items = [
        batch_item(s, body.only_new_tokens, rt.engine.decode(s.token_ids) if not body.only_new_tokens else "")
        for s in started
    ]
    statuses = [s.cache_status.value for s in started]
    overall = "hit" if all(x == "hit" for x in statuses) else (
        "unavailable" if "unavailable" in statuses else "miss")
    return JSONResponse(items, headers={"X-KV-Cache": overall, "X-KV-Cache-Items": ",".join(statuses)})


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


@router.get("/api/cache/{request_id}")
async def cache_info(request: Request, request_id: str):
    rt = runtime(request)
    tenant = authenticate(request)
    try:
        info = await rt.store.info(tenant, request_id)
    except BackendUnavailable:
        raise EngineClosed("the KV store is unavailable") from None
    if info is None:
        raise NotFound(f"no cache record for request_id {request_id!r}", param="request_id")
    return JSONResponse(
        {
            "request_id": request_id,
            "tokens": info.num_tokens,
            "prompt_tokens": info.num_prompt_tokens,
            "bytes": info.nbytes,
            "head_bytes": info.head_nbytes,
            "blocks": info.num_blocks,
            "model": rt.model.name,
            "fingerprint": info.fingerprint,
            "fingerprint_matches": info.fingerprint == rt.model.fingerprint,
            "created_at": _iso(info.created_at),
            "last_used_at": _iso(info.last_used_at),
            "expires_at": _iso(info.expires_at),
        },
        headers={"X-KV-Cache": "hit"},
    )


@router.delete("/api/cache/{request_id}")
async def cache_delete(request: Request, request_id: str):
    rt = runtime(request)
    tenant = authenticate(request)
    try:
        existed = await rt.store.delete(tenant, request_id)
    except BackendUnavailable:
        raise EngineClosed("the KV store is unavailable") from None
    if not existed:
        raise NotFound(f"no cache record for request_id {request_id!r}", param="request_id")
    return Response(status_code=204)

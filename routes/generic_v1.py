"""Routes of the generic v1 dialect: POST /v1/generate and POST /v1/generate/stream (SSE)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protocol import generic_v1 as g
from protocol.adapter import pump
from protocol.common import SSE_DONE, sse
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import Entry, stream

router = APIRouter()
entry = Entry(g.GenerateBody, g.to_engine, g.PARAM_NAMES, g.error_body)


@router.post("/v1/generate", **post_doc(
    g.GenerateBody, {"prompt": "Tell me a story", "maxTokens": 16},
    json_answer({"id": "gen_1", "text": "Once upon a time", "finishReason": "length"}),
    error_example={"error": {"type": "invalid_request_error", "message": "maxTokens: ..."}}))
async def generate(request: Request):
    s, refused = await entry.start(request)
    if refused:
        return refused
    await s.collect()
    return entry.failure(s) or JSONResponse(g.from_engine(f"gen_{uuid.uuid4().hex[:24]}", s),
                                            headers={"X-KV-Cache": s.cache_status.value})


@router.post("/v1/generate/stream", **post_doc(
    g.GenerateBody, {"prompt": "Tell me a story", "maxTokens": 16, "temperature": 0.8},
    stream_answer("text/event-stream", 'data: {"id": "gen_1", "text": "Once", "delta": "Once"}\n\ndata: [DONE]\n\n'),
    error_example={"error": {"type": "invalid_request_error", "message": "maxTokens: ..."}}))
async def generate_stream(request: Request):
    s, refused = await entry.start(request)
    if refused:
        return refused
    framer = g.Framer(f"gen_{uuid.uuid4().hex[:24]}")

    def on_delta(d):
        ev = framer.event(d)
        return sse(ev) if ev else None

    frames = pump(s, on_delta, lambda m: sse(g.stream_error(m)), SSE_DONE, cancel=s.cancel)
    return stream(frames, "text/event-stream", {"X-KV-Cache": s.cache_status.value})

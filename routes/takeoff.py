"""Routes of the Takeoff dialect: POST /generate and POST /generate_stream (raw text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from protocol import takeoff
from protocol.adapter import pump
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import Entry, stream

router = APIRouter()
entry = Entry(takeoff.TakeoffBody, takeoff.to_engine, takeoff.PARAM_NAMES)


@router.post("/generate", **post_doc(
    takeoff.TakeoffBody, {"text": "List 3 things to do in London", "max_new_tokens": 16},
    json_answer({"message": " 1. The British Museum"})))
async def generate(request: Request):
    s, refused = await entry.start(request)
    if refused:
        return refused
    await s.collect()
    return entry.failure(s) or JSONResponse(takeoff.from_engine(s), headers={"X-KV-Cache": s.cache_status.value})


@router.post("/generate_stream", **post_doc(
    takeoff.TakeoffBody, {"text": "List 3 things to do in London", "max_new_tokens": 16},
    stream_answer("text/plain", " 1. The British Museum")))
async def generate_stream(request: Request):
    s, refused = await entry.start(request)
    if refused:
        return refused
    body = pump(s, lambda d: d.text.encode() if d.text else None, takeoff.error_line, cancel=s.cancel)
    return stream(body, "text/plain; charset=utf-8", {"X-KV-Cache": s.cache_status.value})

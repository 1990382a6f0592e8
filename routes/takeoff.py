"""Routes of the Takeoff dialect: POST /generate and POST /generate_stream (raw text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import EngineError
from protocol import takeoff
from protocol.adapter import pump, renamed
from routes.http import error_response, start, stream

router = APIRouter()


async def _start(request: Request):
    return await start(request, takeoff.TakeoffBody, takeoff.to_engine)


@router.post("/generate")
async def generate(request: Request):
    try:
        s = await _start(request)
    except EngineError as exc:
        return error_response(renamed(exc, takeoff.PARAM_NAMES))
    await s.collect()
    if s.error:
        return error_response(EngineError(s.error))
    return JSONResponse(takeoff.from_engine(s), headers={"X-KV-Cache": s.cache_status.value})


@router.post("/generate_stream")
async def generate_stream(request: Request):
    try:
        s = await _start(request)
    except EngineError as exc:
        return error_response(renamed(exc, takeoff.PARAM_NAMES))
    body = pump(s, lambda d: d.text.encode() if d.text else None, takeoff.error_line, cancel=s.cancel)
    return stream(body, "text/plain; charset=utf-8", {"X-KV-Cache": s.cache_status.value})

"""Routes of the Together dialect: POST /inference (JSON, or SSE with stream_tokens)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import EngineError
from protocol import together
from protocol.adapter import pump, renamed
from protocol.common import SSE_DONE, sse
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import authenticate, error_response, read_body, runtime, stream

router = APIRouter()


@router.post("/inference", **post_doc(
    together.InferenceBody, {"prompt": "Alan Turing was", "max_tokens": 16, "stop": ["\n\n"]},
    json_answer({"id": "1", "choices": [{"text": " a mathematician"}], "output": {"choices": [{"text": " a mathematician"}]}},
                "JSON; Server-Sent Events with stream_tokens true"),
    stream_answer("text/event-stream", 'data: {"choices": [{"text": " a"}]}\n\ndata: [DONE]\n\n')))
async def inference(request: Request):
    rt = runtime(request)
    try:
        tenant = authenticate(request)
        body = await read_body(request, together.InferenceBody)
        s = await rt.session.generate(together.to_engine(body, rt.settings.generation_defaults(), tenant))
    except EngineError as exc:
        return error_response(renamed(exc, together.PARAM_NAMES))
    answer_id = uuid.uuid4().hex
    headers = {"X-KV-Cache": s.cache_status.value}
    if body.is_stream:
        def on_delta(d):
            ev = together.event(answer_id, d, s.usage if d.finish_reason else None)
            return sse(ev) if ev else None

        def on_error(message: str) -> bytes:
            return sse({"error": {"type": "internal_error", "message": message}})

        return stream(pump(s, on_delta, on_error, SSE_DONE, cancel=s.cancel), "text/event-stream", headers)
    await s.collect()
    if s.error:
        return error_response(EngineError(s.error))
    return JSONResponse(together.from_engine(answer_id, body.model or rt.model.name, s), headers=headers)

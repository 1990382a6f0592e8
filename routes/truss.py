"""Routes of the Baseten/Truss dialect: POST /predict and POST /v1/models/model:predict."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.types import EngineError
from protocol import truss
from protocol.adapter import pump, renamed
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import error_response, read_body, runtime, stream

router = APIRouter()


async def _predict(request: Request):
    rt = runtime(request)
    try:
        tenant = rt.tenant(truss.authorization(request.headers.get("authorization")))
        body = await read_body(request, truss.TrussBody)
        s = await rt.session.generate(truss.to_engine(body, rt.settings.generation_defaults(), tenant))
    except EngineError as exc:
        return error_response(renamed(exc, {}))
    headers = {"X-KV-Cache": s.cache_status.value}
    if body.stream:
        frames = pump(s, lambda d: d.text.encode() if d.text else None, truss.error_line, cancel=s.cancel)
        return stream(frames, "text/plain; charset=utf-8", headers)
    await s.collect()
    if s.error:
        return error_response(EngineError(s.error))
    return JSONResponse(truss.from_engine(s), headers=headers)


_DOC = post_doc(truss.TrussBody, {"prompt": "What is the Mistral wind?", "max_new_tokens": 16},
                json_answer({"output": " A cold northerly wind"}, "JSON; raw text with stream true"),
                stream_answer("text/plain", " A cold northerly wind"))


@router.post("/predict", **_DOC)
async def predict(request: Request):
    return await _predict(request)


@router.post("/v1/models/model:predict", **_DOC)
async def model_predict(request: Request):
    return await _predict(request)

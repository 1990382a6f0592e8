"""Routes of the OpenAI dialect: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.engine import RequestStream
from model.types import EngineError
from protocol import openai as oa
from protocol.adapter import pump, renamed
from protocol.common import SSE_DONE, sse
from routes.http import authenticate, error_response, read_body, runtime, stream

router = APIRouter()
_STARTED = int(time.time())


def _template(request: Request):
    tokenizer = runtime(request).model.tokenizer

    def render(messages: list[dict[str, str]]) -> list[int]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    return render


async def _frames(s: RequestStream, framer: oa.Framer) -> AsyncIterator[bytes]:
    def on_delta(delta):
        chunk = framer.chunk(delta)
        return sse(chunk) if chunk else None

    def on_error(message: str) -> bytes:
        return sse({"error": {"message": message, "type": "internal_error", "param": None,
                              "code": "internal_error"}})

    try:
        async for frame in pump(s, on_delta, on_error, cancel=s.cancel):
            yield frame
    except (asyncio.CancelledError, GeneratorExit):  # client gone: stop generating now, not at GC
        s.cancel()
        raise
    if framer.include_usage and s.finish_reason not in (None, "error"):
        yield sse(framer.usage_chunk(s.usage))
    yield SSE_DONE


async def _answer(request: Request, chat: bool):
    rt = runtime(request)
    try:
        tenant = authenticate(request)
        defaults = rt.settings.generation_defaults()
        if chat:
            body = await read_body(request, oa.ChatBody)
            req = oa.chat_to_engine(body, defaults, tenant, _template(request))
        else:
            body = await read_body(request, oa.CompletionBody)
            req = oa.completion_to_engine(body, defaults, tenant)
        s = await rt.engine.generate(req)
    except EngineError as exc:
        return error_response(renamed(exc, oa.PARAM_NAMES), oa.error_body)
    framer = oa.Framer(chat, oa.model_id(rt.model.name), body.include_usage)
    headers = {"X-KV-Cache": s.cache_status.value}
    if body.stream:
        return stream(_frames(s, framer), "text/event-stream", headers)
    await s.collect()
    if s.error:
        return error_response(EngineError(s.error), oa.error_body)
    return JSONResponse(framer.response(s), headers=headers)


@router.post("/v1/completions")
async def completions(request: Request):
    return await _answer(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await _answer(request, chat=True)


@router.get("/v1/models")
async def list_models(request: Request):
    try:
        authenticate(request)
    except EngineError as exc:
        return error_response(exc, oa.error_body)
    return JSONResponse(oa.models(oa.model_id(runtime(request).model.name), _STARTED))

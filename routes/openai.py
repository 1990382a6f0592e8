"""Routes of the OpenAI dialect: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.engine import RequestStream
from model.types import Delta, EngineError
from protocol import openai as oa
from protocol import openai_framing as oa_framing
from protocol import openai_logprobs as oa_logprobs
from protocol.adapter import renamed
from protocol.common import SSE_DONE, sse
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import authenticate, error_response, read_body, runtime, stream

router = APIRouter()
log = logging.getLogger("kvbento.http")
_STARTED = int(time.time())


def _template(request: Request):
    tokenizer = runtime(request).model.tokenizer

    def render(messages: list[dict[str, str]]) -> str:
        # Text, not ids: the session matches it against a stored conversation's own tokens.
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return render


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of n choices as they come, tagged with the choice's index. Closing the iterator
    (client gone) cancels the readers, which aborts the sequences still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read(i: int, s: RequestStream) -> None:
        try:
            async for delta in s:
                await queue.put((i, delta))
        except Exception as exc:  # an exception must not end the stream silently
            log.exception("stream failed")
            await queue.put((i, Delta(finish_reason="error", error=f"{type(exc).__name__}: {exc}")))
        finally:
            await queue.put((i, None))

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(readers)
        while open_:
            i, delta = await queue.get()
            if delta is None:
                open_ -= 1
            else:
                yield i, delta
    finally:
        for r in readers:
            r.cancel()


async def _frames(streams: list[RequestStream], framer: oa.Framer) -> AsyncIterator[bytes]:
    if framer.echo:
        for i in range(len(streams)):
            yield sse(framer.echo_chunk(i))
    failed = False
    merged = _merged(streams)
    try:
        async for i, delta in merged:
            if delta.error:
                if delta.text or delta.logprobs:
                    chunk = framer.chunk(Delta(text=delta.text, token_ids=delta.token_ids,
                                               logprobs=delta.logprobs), i)
                    if chunk:
                        yield sse(chunk)
                yield sse({"error": {"message": delta.error, "type": "internal_error", "param": None,
                                     "code": "internal_error"}})
                failed = True
                break
            chunk = framer.chunk(delta, i)
            if chunk:
                yield sse(chunk)
    finally:  # client gone or a choice failed: stop the other choices now, not at GC
        await merged.aclose()
    if framer.include_usage and not failed:
        yield sse(framer.usage_chunk(oa_framing.total_usage(streams)))
    yield SSE_DONE


async def _start_all(rt, reqs: list) -> list[RequestStream]:
    """Start every choice, or none: a refused one cancels those already started."""
    started = await asyncio.gather(*(rt.session.generate(r) for r in reqs), return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for r in started:
            if isinstance(r, RequestStream):
                r.cancel()
        raise failed[0]
    return started


async def _drain(s: RequestStream) -> list:
    """Collect a stream; return its logprob entries."""
    entries: list = []
    async for delta in s:
        entries.extend(delta.logprobs or [])
    return entries


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
        streams = await _start_all(rt, oa.fan_out(req, body.n))
    except EngineError as exc:
        return error_response(renamed(exc, oa.PARAM_NAMES), oa.error_body)
    echo = ""
    if not chat and body.echo:
        echo = body.prompt if isinstance(body.prompt, str) else rt.engine.decode(body.prompt)
    texts = oa_logprobs.TokenTexts(rt.model.tokenizer) if body.num_logprobs is not None else None
    framer = oa.Framer(chat, oa.model_id(rt.model.name), body.include_usage, texts=texts, echo=echo)
    headers = {"X-KV-Cache": streams[0].cache_status.value}
    if body.stream:
        return stream(_frames(streams, framer), "text/event-stream", headers)
    entries = await asyncio.gather(*(_drain(s) for s in streams))
    for s in streams:
        if s.error:
            return error_response(EngineError(s.error), oa.error_body)
    return JSONResponse(framer.response(streams, entries), headers=headers)


@router.post("/v1/completions", **post_doc(
    oa.CompletionBody, {"model": "kvbento", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0},
    json_answer({"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "kvbento",
                 "choices": [{"index": 0, "text": " there was", "logprobs": None, "finish_reason": "length"}],
                 "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}},
                "JSON; Server-Sent Events with stream true"),
    stream_answer("text/event-stream", 'data: {"choices": [{"index": 0, "text": " there"}]}\n\ndata: [DONE]\n\n'),
    error_example={"error": {"message": "logit_bias: Value error, logit_bias is not supported",
                             "type": "invalid_request_error", "param": "logit_bias",
                             "code": "invalid_request_error"}}))
async def completions(request: Request):
    return await _answer(request, chat=False)


@router.post("/v1/chat/completions", **post_doc(
    oa.ChatBody, {"model": "kvbento", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16},
    json_answer({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "kvbento",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                              "logprobs": None, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
                "JSON; Server-Sent Events with stream true"),
    stream_answer("text/event-stream", 'data: {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}\n\n'
                                       "data: [DONE]\n\n"),
    error_example={"error": {"message": "tools: Value error, tools is not supported",
                             "type": "invalid_request_error", "param": "tools", "code": "invalid_request_error"}}))
async def chat_completions(request: Request):
    return await _answer(request, chat=True)


@router.get("/v1/models")
async def list_models(request: Request):
    try:
        authenticate(request)
    except EngineError as exc:
        return error_response(exc, oa.error_body)
    return JSONResponse(oa.models(oa.model_id(runtime(request).model.name), _STARTED))

"""The request-id API as typed BentoML APIs, so ``bentoml.SyncHTTPClient`` / ``AsyncHTTPClient``
get ``generate``, ``generate_stream`` and ``generate_batch`` methods (listed in /schema.json).

They live on their own routes (/bentoml/...): BentoML matches its API routes before the mounted
FastAPI app, so sharing /api/generate would change the seed's bodies and errors. Both faces are
served by the same spec (protocol/request_id.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus

from pydantic import BaseModel, Field

from model.types import EngineError, ServingError
from protocol.request_id import Batch, BatchBody, BatchItem, GenerateBody, GenerationConfig, RequestIdApi
from protocol.spec import Call
from server.http import http_status
from server.runtime import Runtime
from session.session import SessionStream

ROUTE_GENERATE = "/bentoml/generate"
ROUTE_GENERATE_STREAM = "/bentoml/generate_stream"
ROUTE_GENERATE_BATCH = "/bentoml/generate_batch"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class GenerateAnswer(BaseModel):
    """The answer of ``generate``: the same fields as /api/generate's non-streaming JSON."""

    request_id: str
    response: str
    prompt: str | None = Field(default=None, description="only when only_new_tokens is false")
    finish_reason: str | None
    usage: Usage


class BatchAnswer(BaseModel):
    request_id: str
    response: str
    prompt: str | None = Field(default=None, description="only when only_new_tokens is false")


def client_error(exc: ServingError):
    """An engine error as BentoML's own error answer, with the same status code."""
    from bentoml.exceptions import BentoMLException

    return BentoMLException(exc.message, error_code=HTTPStatus(http_status(exc)))


_SINGLE, _BATCH = RequestIdApi(), Batch()


def _call(rt: Runtime, authorization: str | None, body) -> Call:
    """The call as the request-id API's spec serves it (the engine's typed errors are raised)."""
    return Call(body, rt.tenant(authorization), rt.settings.generation_defaults(), rt.settings.served_model_name,
                rt.model.tokenizer, rt.store)


async def start_one(rt: Runtime, authorization: str | None, request_id: str, prompt: str,
                    config: GenerationConfig | None) -> SessionStream:
    """Authenticate and start one generation."""
    body = GenerateBody(request_id=request_id, prompt=prompt, generation_config=config or GenerationConfig())
    [s] = await _SINGLE.start(_call(rt, authorization, body), rt.session)
    return s


async def generate(rt: Runtime, authorization: str | None, request_id: str, prompt: str,
                   only_new_tokens: bool, config: GenerationConfig | None) -> tuple[GenerateAnswer, str]:
    """Returns the answer and the X-KV-Cache status."""
    body = GenerateBody(request_id=request_id, prompt=prompt, only_new_tokens=only_new_tokens,
                        stream_response=False, generation_config=config or GenerationConfig())
    call = _call(rt, authorization, body)
    streams = await _SINGLE.start(call, rt.session)
    answer = await _SINGLE.collect(call, streams)
    if streams[0].error:
        raise EngineError(streams[0].error)
    return GenerateAnswer.model_validate(answer), streams[0].cache_status.value


async def generate_stream(rt: Runtime, s: SessionStream, only_new_tokens: bool) -> AsyncIterator[str]:
    """The text chunks of a started stream (the whole sequence first when only_new_tokens is false)."""
    if not only_new_tokens:
        yield rt.engine.decode(s.base_token_ids)
    try:
        async for delta in s:
            if delta.text:
                yield delta.text
    except (asyncio.CancelledError, GeneratorExit):
        s.cancel()
        raise
    if s.error:
        raise EngineError(s.error)


async def generate_batch(rt: Runtime, authorization: str | None, prompts: list[BatchItem],
                         only_new_tokens: bool, config: GenerationConfig | None) -> list[BatchAnswer]:
    body = BatchBody(prompts=prompts, only_new_tokens=only_new_tokens, generation_config=config or GenerationConfig())
    call = _call(rt, authorization, body)
    items = await _BATCH.collect(call, await _BATCH.start(call, rt.session))
    return [BatchAnswer.model_validate(item) for item in items]

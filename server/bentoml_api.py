"""The request-id API as typed BentoML APIs, so ``bentoml.SyncHTTPClient`` / ``AsyncHTTPClient``
get ``generate``, ``generate_stream`` and ``generate_batch`` methods (listed in /schema.json).

They live on their own routes (/bentoml/...): BentoML matches its API routes before the mounted
FastAPI app, so sharing /api/generate would change the seed's bodies and errors. Both faces start
the same engine requests through the same functions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus

from pydantic import BaseModel, Field

from model.engine import RequestStream
from model.types import EngineError
from protocol.common import BodyError
from protocol.request_id import BatchItem, GenerationConfig, batch_item, from_engine, to_engine
from server.http import status_of
from server.runtime import Runtime

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


def client_error(exc: EngineError):
    """An engine error as BentoML's own error answer, with the same status code."""
    from bentoml.exceptions import BentoMLException

    return BentoMLException(exc.message, error_code=HTTPStatus(status_of(exc)))


async def start_one(rt: Runtime, authorization: str | None, request_id: str, prompt: str,
                    config: GenerationConfig | None) -> RequestStream:
    """Authenticate and start one generation (the engine's typed errors are raised)."""
    tenant = rt.tenant(authorization)
    req = to_engine(request_id, prompt, config or GenerationConfig(), rt.settings.generation_defaults(), tenant)
    return await rt.session.generate(req)


async def generate(rt: Runtime, authorization: str | None, request_id: str, prompt: str,
                   only_new_tokens: bool, config: GenerationConfig | None) -> tuple[GenerateAnswer, str]:
    """Returns the answer and the X-KV-Cache status."""
    s = await start_one(rt, authorization, request_id, prompt, config)
    await s.collect()
    if s.error:
        raise EngineError(s.error)
    full = rt.engine.decode(s.token_ids) if not only_new_tokens else ""
    return GenerateAnswer.model_validate(from_engine(s, only_new_tokens, full)), s.cache_status.value


async def generate_stream(rt: Runtime, s: RequestStream, only_new_tokens: bool) -> AsyncIterator[str]:
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
    ids = [p.request_id for p in prompts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise BodyError(f"prompts: request_id {dupes[0]!r} appears more than once", param="prompts")
    started = await asyncio.gather(
        *(start_one(rt, authorization, p.request_id, p.prompt, config) for p in prompts), return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        for r in started:
            if isinstance(r, RequestStream):
                r.cancel()
        raise failed[0]
    await asyncio.gather(*(s.collect() for s in started))
    return [BatchAnswer.model_validate(
        batch_item(s, only_new_tokens, rt.engine.decode(s.token_ids) if not only_new_tokens else ""))
        for s in started]

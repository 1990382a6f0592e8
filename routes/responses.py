"""Routes of the OpenAI Responses dialect: create, retrieve, delete, list input items."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cache.base import BackendUnavailable
from cache.store import CacheStatus
from model.types import EngineClosed, EngineError, NotFound
from protocol import openai as oa
from protocol import responses as rs
from protocol.common import BodyError
from routes.docs import json_answer, post_doc, stream_answer
from routes.http import authenticate, error_response, read_body, runtime, stream
from session import responses as stored

router = APIRouter()

_EXAMPLE_ANSWER = {
    "id": "resp_1", "object": "response", "created_at": 0, "status": "completed", "model": "kvbento",
    "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}],
    "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11},
    "previous_response_id": None, "instructions": None, "metadata": {}, "incomplete_details": None}


def _render(request: Request):
    tokenizer = runtime(request).model.tokenizer

    def render(messages: list[dict[str, str]]) -> str:
        # Text, not ids: the session matches it against the parent's stored tokens.
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return render


def _page_query(request: Request) -> tuple[str | None, int, str]:
    """``after``, ``limit`` (1-100, default 20) and ``order`` (default desc), as OpenAI pages lists."""
    q = request.query_params
    raw = q.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise BodyError(f"limit: must be an integer between 1 and 100, got {raw!r}", param="limit")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BodyError(f"order: must be 'asc' or 'desc', got {order!r}", param="order")
    return q.get("after") or None, int(raw), order


def _store_down() -> EngineClosed:
    return EngineClosed("the KV store is unavailable")


async def _load(request: Request, response_id: str) -> stored.StoredResponse:
    rt = runtime(request)
    tenant = authenticate(request)
    try:
        rec = await stored.ResponseStore(rt.store).load(tenant, response_id)
    except BackendUnavailable:
        raise _store_down() from None
    if rec is None:
        raise NotFound(f"no stored response {response_id!r}", param="response_id")
    return rec


@router.post("/v1/responses", **post_doc(
    rs.ResponsesBody, {"model": "kvbento", "input": "Hi", "max_output_tokens": 16, "temperature": 0},
    json_answer(_EXAMPLE_ANSWER, "JSON; Server-Sent Events with stream true"),
    stream_answer("text/event-stream", 'event: response.output_text.delta\ndata: {"type": '
                                       '"response.output_text.delta", "delta": "Hello", "sequence_number": 4}\n\n'),
    error_example={"error": {"message": "no stored response 'resp_x'", "type": "not_found_error",
                             "param": "previous_response_id", "code": "not_found_error"}}))
async def create(request: Request):
    rt = runtime(request)
    responses = stored.ResponseStore(rt.store)
    try:
        tenant = authenticate(request)
        body = await read_body(request, rs.ResponsesBody)
        params = body.params(rt.settings.generation_defaults())
        response_id = rs.new_id("resp")
        started = await stored.start(
            rt.session, responses, tenant=tenant, response_id=response_id,
            previous_response_id=body.previous_response_id, instructions=body.instructions,
            new_messages=body.messages, render=_render(request), params=params, store=body.store)
    except BackendUnavailable:
        return error_response(_store_down(), rs.error_body)
    except EngineError as exc:
        return error_response(rs.own_names(exc), rs.error_body)
    framer = rs.Framer(response_id, oa.model_id(rt.model.name), body, params,
                       store_up=started.stream.cache_status is not CacheStatus.UNAVAILABLE)
    items = rs.input_items(body.messages)

    async def keep(final: dict[str, Any]) -> None:
        if not body.store:
            return
        answer = {"role": "assistant", "content": started.stream.text}
        rec = stored.StoredResponse(final, started.messages + [answer], items, list(started.stream.token_ids))
        try:
            await responses.save(tenant, response_id, rec)
        except BackendUnavailable:
            rs.log.warning("the KV store is unavailable: response %s is answered but not stored", response_id)

    events = rs.events(started.stream, framer, keep)
    headers = {"X-KV-Cache": started.stream.cache_status.value}
    if body.stream:
        async def frames():
            async for event in events:
                yield rs.sse_event(event)

        return stream(frames(), "text/event-stream", headers)
    last: dict[str, Any] = {}
    async for event in events:
        last = event
    if last.get("type") == "response.failed":
        return error_response(EngineError(last["response"]["error"]["message"]), rs.error_body)
    return JSONResponse(last["response"], headers=headers)


@router.get("/v1/responses/{response_id}")
async def retrieve(request: Request, response_id: str):
    try:
        rec = await _load(request, response_id)
    except EngineError as exc:
        return error_response(exc, rs.error_body)
    return JSONResponse(rec.response)


@router.delete("/v1/responses/{response_id}")
async def delete(request: Request, response_id: str):
    try:
        tenant = authenticate(request)
        try:
            existed = await stored.ResponseStore(runtime(request).store).delete(tenant, response_id)
        except BackendUnavailable:
            raise _store_down() from None
        if not existed:
            raise NotFound(f"no stored response {response_id!r}", param="response_id")
    except EngineError as exc:
        return error_response(exc, rs.error_body)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(request: Request, response_id: str):
    try:
        after, limit, order = _page_query(request)
        rec = await _load(request, response_id)
        page = rs.list_items(rec.input_items, after, limit, order)
    except EngineError as exc:
        return error_response(exc, rs.error_body)
    return JSONResponse(page)

"""The OpenAI Responses dialect: /v1/responses bodies, the Response object, its stream events and
the input-item listing (field names as in openai-python's ``types/responses``).

A response continues a stored one with ``previous_response_id``: the session layer matches the
re-rendered conversation against the parent's stored tokens, so only the new input is prefilled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from model.types import EngineError, InvalidRequest, ServingError, Usage
from protocol.adapter import OptionalRequestId
from model.params import wire
from protocol.common import STRICT, BodyError, OpenAISampling, accept, refuse, sampling_params
from protocol.openai import SAMPLING_FIELDS, error_body, openai_overrides
from protocol.spec import Call, Dialect, Route
from session import responses as stored
from session.errors import StoreUnavailable
from session.session import SessionStream
from model.constraint import ConstraintSpec
from protocol import responses_tools as rtools
from protocol.tools import FunctionDef

log = logging.getLogger("kvbento.protocol")

# Engine / session field name -> the Responses field a client sent: OpenAI's sampling fields, then
# the names error messages use.
PARAM_NAMES = {"max_new_tokens": "max_output_tokens", **SAMPLING_FIELDS, "prompt": "input",
               "parent_request_id": "previous_response_id"}

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA = 16

# Declared only to be refused unless they carry their no-op value: ignoring them would silently
# change what the client asked for.
_REFUSED = ("reasoning", "conversation", "include", "prompt", "top_logprobs")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _parse_input(value: Any) -> list[dict[str, Any]]:
    """``input`` as chat-template messages (``{"role", "content"}``, tool calls and their results
    as ``tools.py`` writes them); raises BodyError naming the item."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BodyError("input: must be a string or a non-empty list of message items", param="input")
    out = []
    for i, item in enumerate(value):
        at = f"input.{i}"
        if not isinstance(item, dict):
            raise BodyError(f"{at}: must be a message item (an object)", param=at)
        kind = item.get("type", "message")
        if kind in ("function_call", "function_call_output"):
            out.append(rtools.tool_item(item, at))
            continue
        if kind != "message":
            raise BodyError(f"{at}.type: item type {kind!r} is not supported (messages, function_call and "
                            "function_call_output)", param=f"{at}.type")
        role = item.get("role")
        if role not in ROLES:
            raise BodyError(f"{at}.role: must be one of {', '.join(ROLES)}, got {role!r}", param=f"{at}.role")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                pat = f"{at}.content.{j}"
                if not isinstance(part, dict):
                    raise BodyError(f"{pat}: must be a content part (an object)", param=pat)
                if part.get("type") not in TEXT_PARTS:
                    raise BodyError(f"{pat}.type: content part {part.get('type')!r} is not supported "
                                    "(input_text and output_text only)", param=f"{pat}.type")
                if not isinstance(part.get("text"), str):
                    raise BodyError(f"{pat}.text: must be a string", param=f"{pat}.text")
                texts.append(part["text"])
            text = "".join(texts)
        else:
            raise BodyError(f"{at}.content: must be a string or a list of text parts", param=f"{at}.content")
        out.append({"role": role, "content": text})
    return rtools.merge_calls(out)


# Fields OpenAI's clients send that change nothing this server answers, by OpenAI's own definition
# of them: accepted and dropped. Any other undeclared field is refused with a 400 naming it.
ACCEPTED = {
    "service_tier": "which processing tier serves the request (latency and price); one tier here",
}


class ResponsesBody(OpenAISampling):
    """``POST /v1/responses``. Any other field is refused (400), except ``ACCEPTED``."""

    model_config = STRICT

    model: str | None = None
    input: Any = Field(description="a string, or a list of message items (text content only)")
    instructions: str | None = Field(default=None, max_length=1_000_000)
    previous_response_id: str | None = OptionalRequestId
    store: bool = True
    background: bool = False
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_output_tokens: int | None = wire("max_new_tokens")
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    tool_choice: Any = None
    tools: list[Any] | None = Field(default=None, max_length=128)
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    _messages: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _functions: list[FunctionDef] = PrivateAttr(default_factory=list)
    _constraint: ConstraintSpec | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _no_request_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("request_id") is not None:
            raise BodyError("request_id is not used by /v1/responses: continue a conversation with "
                            "previous_response_id", param="request_id")
        return data

    _refused = refuse(*_REFUSED)
    _accepted = accept(ACCEPTED)

    @field_validator("truncation")
    @classmethod
    def _truncation(cls, v: str | None) -> str | None:
        if v == "auto":
            raise ValueError("truncation 'auto' is not supported: a conversation past the context is refused")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if len(v) > MAX_METADATA:
                raise ValueError(f"at most {MAX_METADATA} key-value pairs, got {len(v)}")
            if any(len(k) > 64 or len(val) > 512 for k, val in v.items()):
                raise ValueError("keys are at most 64 characters, values at most 512")
        return v

    @model_validator(mode="after")
    def _checks(self) -> ResponsesBody:
        if self.background and not self.store:
            raise BodyError("background: a background response must be stored (store: true)", param="background")
        self._functions = rtools.functions(self.tools)
        self._constraint = rtools.output_constraint((self.text or {}).get("format"), self._functions,
                                                    self.tool_choice, self.parallel_tool_calls)
        if (self.text or {}).get("verbosity") not in (None, "medium"):
            raise BodyError("text.verbosity: only the default (medium) is supported", param="text.verbosity")
        self._messages = _parse_input(self.input)
        return self

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The new input as chat-template messages."""
        return self._messages

    @property
    def calls_tools(self) -> bool:
        """The answer may hold function calls (tools offered and tool_choice is not none)."""
        return bool(self._functions) and self.tool_choice != "none"

    @property
    def constraint(self) -> ConstraintSpec | None:
        """The output constraint: ``text.format``'s, or the tool choice's."""
        return self._constraint


def input_items(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The new input as ``input_items`` lists it: message items with ids, assistant text as
    ``output_text``."""
    items = []
    for m in messages:
        if m.get("tool_calls") or m["role"] == "tool":
            items += rtools.input_item(m)
            continue
        if m["role"] == "assistant":
            part = {"type": "output_text", "text": m["content"], "annotations": []}
        else:
            part = {"type": "input_text", "text": m["content"]}
        items.append({"id": new_id("msg"), "type": "message", "role": m["role"], "status": "completed",
                      "content": [part]})
    return items


def list_items(items: list[dict[str, Any]], after: str | None, limit: int, order: str) -> dict[str, Any]:
    """One page of ``items`` as OpenAI lists them (``order`` "asc" is input order).

    Raises:
        InvalidRequest: ``after`` names no item of the list.
    """
    ordered = list(items) if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        ids = [it["id"] for it in ordered]
        if after not in ids:
            raise InvalidRequest(f"after: no input item {after!r} in this response", param="after")
        start = ids.index(after) + 1
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}


def usage(u: Usage, store_up: bool = True) -> dict[str, Any]:
    """Token counts; the input positions this request computed are the ones it leaves in the store."""
    written = u.prompt_tokens - u.cached_tokens if store_up else 0
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": written},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class ResponseObject:
    """The Response object of one request and its stream events (with rising sequence numbers)."""

    def __init__(self, response_id: str, model: str, body: ResponsesBody, params, *, store_up: bool = True) -> None:
        self.id = response_id
        self.store_up = store_up
        self.model = model
        self.body = body
        self.params = params
        self.created_at = int(time.time())
        self.item_id = new_id("msg")
        self.sequence_number = 0
        self.output_index = 0  # of the message item, in a response that may also call tools
        self._fc_ids: list[str] = []

    def call_item_id(self, index: int) -> str:
        """The output item id of the answer's ``index``-th call (stable across stream and record)."""
        while len(self._fc_ids) <= index:
            self._fc_ids.append(new_id("fc"))
        return self._fc_ids[index]

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, status: str, text: str | None = None, u: Usage | None = None, *,
                 error: str | None = None) -> dict[str, Any]:
        """The Response object: ``status`` is in_progress, completed, incomplete or failed."""
        b, p = self.body, self.params
        item_status = {"in_progress": "in_progress", "completed": "completed"}.get(status, "incomplete")
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": b.background,
            "error": {"code": "server_error", "message": error} if error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "max_tool_calls": b.max_tool_calls, "model": self.model,
            "output": self.output(item_status, text),
            "parallel_tool_calls": b.parallel_tool_calls if b.parallel_tool_calls is not None else True,
            "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": b.store, "temperature": p.temperature if p.do_sample else 0.0,
            "text": {"format": (b.text or {}).get("format") or {"type": "text"}},
            "tool_choice": b.tool_choice or "auto", "tools": b.tools or [],
            "top_p": p.top_p, "truncation": "disabled", "usage": usage(u, self.store_up) if u is not None else None,
            "user": b.user, "metadata": b.metadata or {},
        }

    def output(self, item_status: str, text: str | None) -> list[dict[str, Any]]:
        if text is None:
            return []
        return rtools.output(self, item_status, text) if self.body.calls_tools else [self.message(item_status, text)]

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        out = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return out

    def item_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self.event(kind, item_id=self.item_id, output_index=self.output_index, content_index=0, **fields)


def response_status(finish_reason: str | None, error: str | None) -> str:
    if error or finish_reason == "error":
        return "failed"
    return "incomplete" if finish_reason == "length" else "completed"


class TextOutput:
    """The one message item of an answer without tools, streamed as its text comes."""

    def __init__(self, framer: ResponseObject) -> None:
        self.framer = framer
        self.text = ""

    def open(self) -> list[dict[str, Any]]:
        f = self.framer
        return [f.event("response.output_item.added", output_index=0, item=f.message("in_progress", None)),
                f.item_event("response.content_part.added", part=f.part(""))]

    def feed(self, text: str, final: bool) -> list[dict[str, Any]]:
        self.text += text
        return [self.framer.item_event("response.output_text.delta", delta=text, logprobs=[])] if text else []

    def close(self, item_status: str) -> list[dict[str, Any]]:
        f, text = self.framer, self.text
        return [f.item_event("response.output_text.done", text=text, logprobs=[]),
                f.item_event("response.content_part.done", part=f.part(text)),
                f.event("response.output_item.done", output_index=0, item=f.message(item_status, text))]


async def events(stream: SessionStream, framer: ResponseObject,
                 on_done: Callable[[dict[str, Any]], Awaitable[None]],
                 out: "TextOutput | rtools.Output | None" = None) -> AsyncIterator[dict[str, Any]]:
    """The stream events of one response, in OpenAI's order, ending with ``response.completed``,
    ``response.incomplete`` or (after an ``error`` event) ``response.failed``. ``out`` frames the
    output items (default: one text message; ``rtools.Output`` for answers that may call tools).

    ``on_done(final_response)`` runs before the last event of a response that did not fail, so a
    client that continues it as soon as it sees the end finds it stored. A client that goes away
    aborts the sequence.
    """
    out = out if out is not None else TextOutput(framer)
    yield framer.event("response.created", response=framer.response("in_progress"))
    yield framer.event("response.in_progress", response=framer.response("in_progress"))
    for ev in out.open():
        yield ev
    error = None
    try:
        async for delta in stream:
            for ev in out.feed(delta.text, final=delta.finish_reason is not None):
                yield ev
            if delta.error:
                error = delta.error
    except (asyncio.CancelledError, GeneratorExit):
        stream.cancel()
        raise
    except Exception as exc:  # an exception must not end the stream silently
        log.exception("stream failed")
        error = f"{type(exc).__name__}: {exc}"
    status = response_status(stream.finish_reason, error)
    if status == "failed":
        error = error or "generation failed"
        yield framer.event("error", code="server_error", message=error, param=None)
        yield framer.event("response.failed", response=framer.response("failed", stream.text, stream.usage,
                                                                         error=error))
        return
    for ev in out.close("completed" if status == "completed" else "incomplete"):
        yield ev
    final = framer.response(status, stream.text, stream.usage)
    await on_done(final)
    yield framer.event(f"response.{status}", response=final)


def sse_event(event: dict[str, Any]) -> bytes:
    """One Server-Sent Event named by the event's type, as OpenAI sends them."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


_EXAMPLE_ANSWER = {
    "id": "resp_1", "object": "response", "created_at": 0, "status": "completed", "model": "kvbento",
    "output": [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}],
    "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11},
    "previous_response_id": None, "instructions": None, "metadata": {}, "incomplete_details": None}


class Responses(Dialect):
    """POST /v1/responses: a response continues ``previous_response_id``'s stored conversation; its
    own record (the Response, the messages, the token ids) is kept next to its head."""

    name = "responses"
    body = ResponsesBody
    routes = (Route("/v1/responses", example={"model": "kvbento", "input": "Hi", "max_output_tokens": 16,
                                              "temperature": 0},
                    answer_example=_EXAMPLE_ANSWER,
                    stream_example='event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
                                   '"delta": "Hello", "sequence_number": 4}\n\n'),)
    error_example = {"error": {"message": "no stored response 'resp_x'", "type": "not_found_error",
                               "param": "previous_response_id", "code": "not_found_error"}}
    fields = PARAM_NAMES
    media_type = "text/event-stream"

    def renamed(self, exc: ServingError, body: Any = None) -> ServingError:
        if exc.param == "prompt" and exc.message.startswith("prompt "):
            exc.message = "input (with the conversation it continues) " + exc.message[len("prompt "):]
        return super().renamed(exc, body)

    def error_body(self, exc: ServingError) -> dict[str, Any]:
        return error_body(exc)

    async def start(self, call: Call, session: Any) -> list[SessionStream]:
        body = call.body
        params = sampling_params(call.defaults, {**openai_overrides(self.overrides(body)),
                                                 "constraint": body.constraint})
        response_id = new_id("resp")
        responses = stored.ResponseStore(call.store)

        extra = rtools.template_kwargs(body._functions, body.messages, call.tokenizer)

        def render(messages: list[dict[str, Any]]) -> str:
            # Text, not ids: the session matches it against the parent's stored tokens.
            return call.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      **extra)

        started = await stored.start(
            session, responses, tenant=call.tenant, response_id=response_id,
            previous_response_id=body.previous_response_id, instructions=body.instructions,
            new_messages=body.messages, render=render, params=params, store=body.store,
            save_blocks_early=body.background)
        store_up = started.stream.cache_status.value != "unavailable"
        framer = ResponseObject(response_id, call.model_name, body, params, store_up=store_up)
        call.state.update(started=started, responses=responses, response_id=response_id, framer=framer)
        if body.background:
            from protocol import responses_background

            if not store_up:
                started.stream.cancel()
                raise StoreUnavailable("the KV store is unavailable: a background response cannot be kept")
            await responses_background.start(call, session, call.background, framer, started, responses)
        return [started.stream]

    def _events(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        body, st = call.body, call.state
        started = st["started"]

        async def keep(final: dict[str, Any]) -> None:
            if not body.store:
                return
            text = started.stream.text
            answer = rtools.answer_message(text) if body.calls_tools else {"role": "assistant", "content": text}
            rec = stored.StoredResponse(final, started.messages + [answer], input_items(body.messages),
                                        list(started.stream.token_ids))
            try:
                await st["responses"].save(call.tenant, st["response_id"], rec)
            except StoreUnavailable:
                log.warning("the KV store is unavailable: response %s is answered but not stored", st["response_id"])

        if body.calls_tools:
            return events(started.stream, st["framer"], keep, rtools.Output(st["framer"]))
        return events(started.stream, st["framer"], keep)

    async def frames(self, call: Call, streams: list[SessionStream]) -> AsyncIterator[bytes]:
        if call.body.background:  # the job's events as the store has them, from the first
            events_ = call.background.follow(call.tenant, call.state["response_id"], -1)
        else:
            events_ = self._events(call)
        async for event in events_:
            yield sse_event(event)

    async def collect(self, call: Call, streams: list[SessionStream]) -> Any:
        if call.body.background:
            return call.state["framer"].response("in_progress")
        last: dict[str, Any] = {}
        async for event in self._events(call):
            last = event
        if last.get("type") == "response.failed":
            raise EngineError(last["response"]["error"]["message"])
        return last["response"]

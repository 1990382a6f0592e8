"""The OpenAI Responses dialect: /v1/responses bodies and the input-item listing (field names as in
openai-python's ``types/responses``); the Response object and its stream events are in
``protocol.responses_events``.

A response continues a stored one with ``previous_response_id``: the session layer matches the
re-rendered conversation against the parent's stored tokens, so only the new input is prefilled.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from model.types import EngineError, InvalidRequest, ServingError
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
from protocol.responses_events import ResponseObject, events, new_id, sse_event
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

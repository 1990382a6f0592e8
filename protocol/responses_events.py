"""The Responses API's output side: the Response object of one request, its stream events (in
OpenAI's order, with rising sequence numbers) and their SSE framing (field names as in
openai-python's ``types/responses``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from model.types import Usage
from protocol import responses_tools as rtools
from session.session import SessionStream

if TYPE_CHECKING:
    from protocol.responses import ResponsesBody

log = logging.getLogger("kvbento.protocol")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


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

"""The Responses dialect's stream framing, fed scripted engine deltas: OpenAI's event order, rising
sequence numbers, every event valid for openai-python's types, the record written before the last
event, and a failure after the stream started as an ``error`` event then ``response.failed``.

(An engine failure cannot be provoked on demand in a real server, hence the scripted stream.)"""

from __future__ import annotations

import asyncio
import typing

import pytest
from openai.types.responses import Response, ResponseStreamEvent

from model.types import Delta, SamplingParams, Usage
from protocol import responses as rs
from protocol import responses_events as rev

# Each event type's own class in openai-python, to validate against (strictly, unlike the SDK).
EVENTS = {typing.get_args(c.model_fields["type"].annotation)[0]: c
          for c in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}


def valid(event: dict) -> None:
    EVENTS[event["type"]].model_validate(event)


class ScriptedStream:
    """The part of RequestStream the framing reads, replaying fixed deltas."""

    def __init__(self, deltas: list[Delta]) -> None:
        self.deltas = deltas
        self.finish_reason = None
        self.text = ""
        self.usage = Usage(prompt_tokens=10, completion_tokens=len(deltas), cached_tokens=7)
        self.cancelled = False

    async def __aiter__(self):
        for d in self.deltas:
            self.text += d.text
            if d.finish_reason:
                self.finish_reason = d.finish_reason
            yield d

    def cancel(self) -> None:
        self.cancelled = True


def run(deltas: list[Delta], **body) -> tuple[list[dict], list[str]]:
    b = rs.ResponsesBody.model_validate({"input": "hi", **body})
    framer = rev.ResponseObject("resp_1", "kvbento-tiny", b, SamplingParams())
    log: list[str] = []

    async def on_done(final: dict) -> None:
        log.append(final["status"])

    async def collect():
        out = []
        async for e in rev.events(ScriptedStream(deltas), framer, on_done):
            out.append(e)
            log.append(e["type"])
        return out

    return asyncio.run(collect()), log


@pytest.mark.parametrize("reason, status", [("stop", "completed"), ("length", "incomplete")])
def test_events_in_order_and_valid(reason, status):
    events, log = run([Delta(text="Hel"), Delta(text="lo", finish_reason=reason)], max_output_tokens=2)
    types = [e["type"] for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{status}"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        valid(e)
    final = Response.model_validate(events[-1]["response"])
    assert final.status == status and final.output_text == "Hello" and final.usage.input_tokens_details.cached_tokens == 7
    assert final.usage.input_tokens_details.cache_write_tokens == 3  # the input positions computed here
    assert (final.incomplete_details is not None) == (status == "incomplete")
    assert log[-2:] == [status, f"response.{status}"]  # stored before the client sees the end


def test_a_failure_after_the_start_is_an_error_event_then_failed():
    events, log = run([Delta(text="Hel"), Delta(finish_reason="error", error="engine exploded")])
    assert [e["type"] for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert events[-2]["message"] == "engine exploded" and events[-2]["code"] == "server_error"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error.message == "engine exploded"
    for e in events:
        valid(e)
    assert "failed" not in log[:-1] and "completed" not in log  # nothing stored


def test_input_items_pages():
    items = rs.input_items([{"role": "user", "content": str(i)} for i in range(5)])
    page = rs.list_items(items, None, 2, "asc")
    assert [i["content"][0]["text"] for i in page["data"]] == ["0", "1"] and page["has_more"]
    page = rs.list_items(items, page["last_id"], 10, "asc")
    assert [i["content"][0]["text"] for i in page["data"]] == ["2", "3", "4"] and not page["has_more"]
    assert rs.list_items(items, None, 20, "desc")["first_id"] == items[-1]["id"]
    with pytest.raises(rs.InvalidRequest) as e:
        rs.list_items(items, "msg_nope", 2, "asc")
    assert e.value.param == "after"

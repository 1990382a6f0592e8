"""Structured outputs and tool calling on the Responses API with the official `openai` SDK:
text.format json_schema and ``responses.parse``, and a tool loop (function_call items ->
function_call_output after previous_response_id) alternating two `bentoml serve` replicas that
share Redis, streamed and not, with the turn before's KV reused."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.test_structured_outputs import TOOL_SCHEMAS, Person
from tests.integration.test_constraint import SCHEMAS

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

WEATHER = {"type": "function", "name": "get_weather", "parameters": TOOL_SCHEMAS["get_weather"], "strict": True}
CLOCK = {"type": "function", "name": "get_time", "parameters": TOOL_SCHEMAS["get_time"]}
KEY = "resp-key-alpha"  # one of the shared replica pair's PAIR_KEYS (tests/e2e/conftest.py)


@pytest.fixture(scope="module")
def replicas(redis_pair):
    return [openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=120) for s in redis_pair]


def test_text_format_json_schema_and_parse(replicas):
    a, _ = replicas
    for name in ("nested", "ref"):
        r = a.responses.create(model="m", input="data please", max_output_tokens=200, temperature=1,
                               text={"format": {"type": "json_schema", "name": name, "schema": SCHEMAS[name],
                                                "strict": True}})
        jsonschema.validate(json.loads(r.output_text), SCHEMAS[name])
        assert r.text.format.type == "json_schema"
    parsed = a.responses.parse(model="m", input="a person", max_output_tokens=300, temperature=1,
                               text_format=Person)
    assert isinstance(parsed.output_parsed, Person)


def _events_in_order(events) -> openai.types.responses.Response:
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    final = events[-1].response
    calls = [o for o in final.output if o.type == "function_call"]
    for call in calls:
        mine = [e for e in events if getattr(e, "item_id", None) == call.id or
                getattr(getattr(e, "item", None), "id", None) == call.id]
        kinds = [e.type for e in mine]
        assert kinds[0] == "response.output_item.added" and mine[0].item.arguments == ""
        assert kinds[-2:] == ["response.function_call_arguments.done", "response.output_item.done"]
        assert set(kinds[1:-2]) <= {"response.function_call_arguments.delta"}
        assert "".join(e.delta for e in mine[1:-2]) == mine[-2].arguments == call.arguments
    return final


@pytest.mark.parametrize("stream", [False, True])
def test_tool_loop_across_replicas(replicas, stream):
    a, b = replicas
    kw = dict(model="m", max_output_tokens=80, temperature=0, tools=[WEATHER, CLOCK], instructions="Use tools.")
    if stream:
        first = _events_in_order(list(a.responses.create(input="Weather in Paris?", tool_choice="required",
                                                         stream=True, **kw)))
    else:
        first = a.responses.create(input="Weather in Paris?", tool_choice="required", **kw)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and first.status == "completed"
    for c in calls:
        assert c.call_id.startswith("call_") and c.name in TOOL_SCHEMAS
        jsonschema.validate(json.loads(c.arguments), TOOL_SCHEMAS[c.name])
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
    second = b.responses.create(input=results, previous_response_id=first.id, tool_choice="none", **kw)
    assert second.status in ("completed", "incomplete") and second.output[0].type == "message"
    assert second.usage.input_tokens_details.cached_tokens > first.usage.input_tokens
    # A named function on the next turn, back on the first replica.
    third = a.responses.create(input="And the time?", previous_response_id=second.id,
                               tool_choice={"type": "function", "name": "get_time"}, **kw)
    assert [o.name for o in third.output if o.type == "function_call"][:1] == ["get_time"]
    assert third.usage.input_tokens_details.cached_tokens > second.usage.input_tokens // 2

"""Background responses with tools and structured output (``text.format``), through the official
``openai`` SDK on a real server: the events of a background tool call or JSON answer are the
foreground answer's, and a constrained answer cut by a restart mid-generation is finished by the
restarted server (it generates the answer again from its prompt, the stored events dropped) with
exactly the events of an uninterrupted run."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import OpenAI

from tests.e2e.polling import read_running, wait_done

from tests.e2e.test_structured_outputs import TOOL_SCHEMAS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE = {"KVBENTO_LEASE_SECONDS": "2"}
WEATHER = {"type": "function", "name": "get_weather", "parameters": TOOL_SCHEMAS["get_weather"], "strict": True}
# A long constrained answer: 300 digits in a JSON array (about two tokens each).
DIGITS = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9},
                                                  "minItems": 300, "maxItems": 300}},
          "required": ["n"], "additionalProperties": False}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "digits", "schema": DIGITS, "strict": True}}


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=300)


def norm(event) -> tuple:
    """What two runs of one greedy answer share (ids and times differ)."""
    e = event.model_dump()
    item = e.get("item") or {}
    return (e["type"], e["sequence_number"], e.get("delta"), e.get("text"), e.get("arguments"), item.get("type"),
            item.get("name"), (e.get("response") or {}).get("status"))


def test_background_tool_call_is_the_foreground_one(server):
    c = client(server)
    ask = dict(model="kvbento", input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
               max_output_tokens=200, temperature=0)
    fg = list(c.responses.create(stream=True, **ask))
    bg = list(c.responses.create(stream=True, background=True, **ask))
    assert [norm(e) for e in bg] == [norm(e) for e in fg]
    r = wait_done(c, bg[0].response.id)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), TOOL_SCHEMAS["get_weather"])
    # The tool step goes on from the background response, as from any stored one.
    nxt = c.responses.create(model="kvbento", previous_response_id=r.id, max_output_tokens=8, temperature=0,
                             tools=[WEATHER], input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                      "output": '{"celsius": 21}'}])
    assert nxt.status in ("completed", "incomplete")


def test_background_json_answer_is_the_foreground_one(server):
    c = client(server)
    ask = dict(model="kvbento", input="Digits please", text=JSON_FORMAT, max_output_tokens=1500, temperature=0)
    fg = c.responses.create(**ask)
    r = wait_done(c, c.responses.create(background=True, **ask).id)
    assert r.status == fg.status and r.output_text == fg.output_text
    jsonschema.validate(json.loads(r.output_text), DIGITS)
    replay = list(c.responses.retrieve(r.id, stream=True))
    assert "".join(e.delta for e in replay if e.type == "response.output_text.delta") == r.output_text


def test_constrained_answer_cut_by_a_restart_is_finished_exactly(server_factory, tmp_path):
    s = server_factory(LEASE, cache_dir=tmp_path / "kv")  # private: it is killed and restarted
    c = client(s)
    ask = dict(model="kvbento", input="Many digits please", text=JSON_FORMAT, max_output_tokens=1500, temperature=0)
    reference = [norm(e) for e in c.responses.create(stream=True, background=True, **ask)]
    r = c.responses.create(background=True, **ask)
    seen = read_running(c, r.id)
    s.kill()
    s.start()
    rest = list(c.responses.retrieve(r.id, stream=True, starting_after=seen[-1].sequence_number))
    assert [norm(e) for e in seen + rest] == reference
    done = c.responses.retrieve(r.id)
    jsonschema.validate(json.loads(done.output_text), DIGITS)
    s.stop()

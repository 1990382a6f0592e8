"""Tool-call text <-> OpenAI shapes: what a tool choice constrains, calls read from a finished
answer and from a stream cut anywhere, and the structured-output fields refused by name."""

import pytest

from model.constraint import ConstraintSpec
from protocol.common import BodyError
from protocol.structured import from_response_format, from_vllm
from protocol.tools import CallStream, FunctionDef, chosen, constraint, split_calls

TEXT = ('Sure. <tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","days":3}}\n</tool_call>\n'
        '<tool_call>\n{"name":"noop","arguments":{}}\n</tool_call>')
FNS = [FunctionDef(name="get_weather", parameters={"type": "object"}), FunctionDef(name="noop")]


def test_split_calls_reads_every_call_and_the_text_before():
    content, calls = split_calls(TEXT)
    assert content == "Sure. "
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris","days":3}'), ("noop", "{}")]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    # An unfinished or malformed block is text, not a call.
    assert split_calls('x <tool_call>\n{"name":"f","argu') == ('x <tool_call>\n{"name":"f","argu', [])
    assert split_calls("<tool_call>nope</tool_call>") == ("<tool_call>nope</tool_call>", [])


@pytest.mark.parametrize("step", [1, 2, 5, 13, len(TEXT)])
def test_a_stream_cut_anywhere_gives_the_same_calls(step):
    reader = CallStream()
    content, calls, headers = "", {}, []
    pieces = [TEXT[i:i + step] for i in range(0, len(TEXT), step)]
    for k, piece in enumerate(pieces):
        c, parts = reader.feed(piece, final=k == len(pieces) - 1)
        content += c
        for i, call, inc, header in parts:
            if header:
                assert inc == "" and i not in calls
                headers.append((i, call.name))
                calls[i] = ""
            else:
                calls[i] += inc
    assert content == "Sure. " and headers == [(0, "get_weather"), (1, "noop")]
    assert calls == {0: '{"city":"Paris","days":3}', 1: "{}"}


def test_tool_choice_modes():
    assert chosen(FNS, None, "tool_choice")[0] == "auto" and chosen([], None, "tool_choice")[0] == "none"
    assert chosen(FNS, {"type": "function", "function": {"name": "noop"}}, "tool_choice") == ("required", FNS[1:])
    assert chosen(FNS, {"type": "function", "name": "noop"}, "tool_choice") == ("required", FNS[1:])
    for bad in ("sometimes", {"type": "function", "name": "nope"}, {"type": "custom"}):
        with pytest.raises(BodyError) as e:
            chosen(FNS, bad, "tool_choice")
        assert e.value.param == "tool_choice"
    with pytest.raises(BodyError, match="needs tools"):
        chosen([], "required", "tool_choice")
    assert constraint(FNS, "none", True) is None
    auto = constraint(FNS, "auto", True)
    assert auto.trigger == "<tool_call>" and auto.kind == "grammar"
    assert constraint(FNS, "required", False).trigger is None


def test_structured_output_fields():
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert spec == ConstraintSpec("json", {"type": "object"}, param="response_format.json_schema.schema")
    assert from_response_format({"type": "text"}) is None
    flat = from_response_format({"type": "json_schema", "name": "x", "schema": {}}, "text.format", flat=True)
    assert flat.param == "text.format.schema"
    assert from_vllm({"regex": "a+"}, {}).kind == "regex"
    assert from_vllm(None, {"guided_choice": ["a", "b"]}).value == ["a", "b"]
    assert from_vllm(None, {"guided_json": '{"type": "object"}'}).value == {"type": "object"}
    for structured, guided, param in ((None, {"guided_choice": []}, "guided_choice"),
                                      ({"xml": "<a/>"}, {}, "structured_outputs.xml"),
                                      (None, {"guided_json": "{nope"}, "guided_json"),
                                      ({"regex": "a"}, {"guided_regex": "b"}, "guided_regex")):
        with pytest.raises(BodyError) as e:
            from_vllm(structured, guided)
        assert e.value.param == param
    with pytest.raises(BodyError) as e:
        from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.param == "response_format.json_schema.schema"

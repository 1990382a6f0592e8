"""The stateless dialect adapters without a server: body validation, engine requests, framing, and
the stream pump's error path (an exception mid-stream is an error frame, then the normal end)."""

from __future__ import annotations

import asyncio
import json

import pytest

from model.types import Delta, InvalidRequest
from protocol import generic_v1, openai as oa, takeoff, together, truss
from protocol.adapter import engine_request, pump, renamed
from protocol.common import SSE_DONE, BodyError, parse_json, sse

DEFAULTS = {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}


def body(schema, **fields):
    return parse_json(json.dumps(fields).encode(), schema)


def drain(gen) -> list[bytes]:
    async def run():
        return [x async for x in gen]
    return asyncio.run(run())


# --- request ids -------------------------------------------------------------------------------
def test_without_request_id_a_fresh_anonymous_id_that_still_uses_the_store():
    a = engine_request("cmpl", None, "t", DEFAULTS, {}, prompt="x")
    b = engine_request("cmpl", None, "t", DEFAULTS, {}, prompt="x")
    assert a.request_id != b.request_id and a.request_id.startswith("cmpl-")
    assert a.use_cache is True and a.named is False and a.continue_stored is False
    c = engine_request("cmpl", "my-id", "t", DEFAULTS, {"max_new_tokens": 7, "top_k": None}, prompt="x")
    assert (c.request_id, c.named, c.params.max_new_tokens, c.params.top_k) == ("my-id", True, 7, 50)


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "x" * 300])
def test_request_id_is_checked(bad):
    with pytest.raises(BodyError) as exc:
        body(together.InferenceBody, prompt="x", request_id=bad)
    assert exc.value.param == "request_id"


def test_renamed_uses_the_dialect_field_name():
    exc = InvalidRequest("generation_config.max_new_tokens must be between 1 and 9, got 99",
                         param="max_new_tokens")
    renamed(exc, oa.PARAM_NAMES)
    assert exc.param == "max_tokens" and exc.message.startswith("max_tokens must be")


# --- OpenAI ------------------------------------------------------------------------------------
def test_openai_body_rules():
    with pytest.raises(BodyError, match="less than or equal to 8"):
        body(oa.CompletionBody, prompt="x", n=9)
    with pytest.raises(BodyError, match="only one prompt"):
        body(oa.CompletionBody, prompt=["a", "b"])
    with pytest.raises(BodyError, match="presence_penalty"):
        body(oa.ChatBody, messages=[{"role": "user", "content": "x"}], presence_penalty=2.5)
    with pytest.raises(BodyError, match="tools"):
        body(oa.ChatBody, messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    with pytest.raises(BodyError, match="response_format"):
        body(oa.ChatBody, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"})
    b = body(oa.CompletionBody, prompt=["only"], stop="\n", temperature=0)
    req = oa.completion_to_engine(b, DEFAULTS, "t")
    assert req.prompt == "only" and req.params.stop == ["\n"] and req.params.max_new_tokens == 16
    assert req.params.do_sample is False
    ids = oa.completion_to_engine(body(oa.CompletionBody, prompt=[5, 6, 7]), DEFAULTS, "t")
    assert ids.prompt_ids == [5, 6, 7] and ids.prompt is None


def test_openai_chat_passes_template_text_and_prefers_max_completion_tokens():
    seen = {}

    def template(messages):
        seen["m"] = messages
        return "<rendered>"

    b = body(oa.ChatBody, messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                    {"role": "user", "content": "b"}],
             max_tokens=5, max_completion_tokens=9, temperature=0.5, seed=3)
    req = oa.chat_to_engine(b, DEFAULTS, "t", template)
    assert seen["m"] == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert req.prompt == "<rendered>" and req.prompt_ids is None and req.special_tokens is False
    assert req.params.max_new_tokens == 9
    assert req.params.do_sample is True and req.params.seed == 3

    def broken(_):
        raise ValueError("no template")

    with pytest.raises(InvalidRequest) as exc:
        oa.chat_to_engine(b, DEFAULTS, "t", broken)
    assert exc.value.param == "messages"


def test_openai_chat_chunks():
    f = oa.Framer(chat=True, model="m", include_usage=True)
    first = f.chunk(Delta(text="Hi"))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"} and first["usage"] is None
    assert f.chunk(Delta()) is None
    last = f.chunk(Delta(finish_reason="length"))
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert oa.finish_reason("abort") == "stop"
    err = oa.error_body(InvalidRequest("bad", param="n"))["error"]
    assert err == {"message": "bad", "type": "invalid_request_error", "param": "n",
                   "code": "invalid_request_error"}


# --- the others --------------------------------------------------------------------------------
def test_takeoff_truss_together_generic_map_their_fields():
    t = takeoff.to_engine(body(takeoff.TakeoffBody, text="x", sampling_topk=3, max_new_tokens=4),
                          DEFAULTS, "t")
    assert (t.prompt, t.params.top_k, t.params.max_new_tokens) == ("x", 3, 4)
    r = truss.to_engine(body(truss.TrussBody, prompt="y", stream=True, max_new_tokens=5), DEFAULTS, "t")
    assert (r.prompt, r.params.max_new_tokens) == ("y", 5)
    g = together.to_engine(body(together.InferenceBody, prompt="z", stop="##", max_tokens=6, temperature=0.7,
                                model="any"), DEFAULTS, "t")
    assert (g.params.stop, g.params.max_new_tokens, g.params.do_sample) == (["##"], 6, True)
    v = generic_v1.to_engine(body(generic_v1.GenerateBody, prompt="w", maxTokens=2), DEFAULTS, "t")
    assert v.params.max_new_tokens == 2


def test_truss_reads_api_key_as_bearer():
    assert truss.authorization("Api-Key abc") == "Bearer abc"
    assert truss.authorization("Bearer abc") == "Bearer abc"
    assert truss.authorization(None) is None


def test_together_and_generic_events():
    ev = together.event("id1", Delta(text=" a"))
    assert ev == {"choices": [{"text": " a"}], "result_type": "language-model-inference", "id": "id1"}
    assert together.event("id1", Delta()) is None
    f = generic_v1.Framer("gen_1")
    assert f.event(Delta(text="Once")) == {"id": "gen_1", "text": "Once", "delta": "Once"}
    assert f.event(Delta(text=" upon")) == {"id": "gen_1", "text": "Once upon", "delta": " upon"}
    assert f.event(Delta(finish_reason="stop"))["finishReason"] == "stop"


# --- the pump ----------------------------------------------------------------------------------
async def deltas_then(exc: Exception | None, *items: Delta):
    for d in items:
        yield d
    if exc is not None:
        raise exc


def test_pump_turns_an_exception_into_an_error_event_then_ends():
    frames = drain(pump(deltas_then(RuntimeError("boom"), Delta(text="a")), lambda d: sse({"t": d.text}),
                        lambda m: sse(generic_v1.stream_error(m)), SSE_DONE))
    assert frames[0] == b'data: {"t":"a"}\n\n'
    assert json.loads(frames[1][6:])["error"] == {"type": "internal_error", "message": "RuntimeError: boom"}
    assert frames[2] == SSE_DONE and len(frames) == 3


def test_pump_turns_an_engine_error_delta_into_an_error_event():
    failed = Delta(text="b", finish_reason="error", error="oom")
    frames = drain(pump(deltas_then(None, Delta(text="a"), failed), lambda d: d.text.encode(),
                        takeoff.error_line))
    assert frames[:2] == [b"a", b"b"] and b'"message": "oom"' in frames[2] and len(frames) == 3


def test_pump_cancels_when_the_client_goes_away():
    cancelled = []

    async def run():
        gen = pump(deltas_then(None, Delta(text="a"), Delta(text="b")), lambda d: d.text.encode(),
                   takeoff.error_line, cancel=lambda: cancelled.append(True))
        assert await gen.__anext__() == b"a"
        await gen.aclose()

    asyncio.run(run())
    assert cancelled == [True]

"""The dialect specs without a server: body validation, engine requests from the field tables,
framing, and the streamed answer's error path (an exception mid-stream is an error frame, then the
normal end)."""

from __future__ import annotations

import asyncio
import json

import pytest

from model.types import Delta, InvalidRequest
from protocol import generic_v1, openai as oa, takeoff, together, truss
from protocol.adapter import engine_request
from protocol.common import SSE_DONE, BodyError, parse_json
from protocol.spec import Call

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


def test_renamed_uses_the_dialect_field_name_from_its_field_table():
    def exc():
        return InvalidRequest("generation_config.max_new_tokens must be between 1 and 9, got 99",
                              param="max_new_tokens")
    e = oa.Completions().renamed(exc())
    assert e.param == "max_tokens" and e.message.startswith("max_tokens must be")
    assert generic_v1.GenericV1().renamed(exc()).param == "maxTokens"
    assert oa.Chat().renamed(exc()).param == "max_completion_tokens"


def call(body_, tenant="t"):
    return Call(body_, tenant, DEFAULTS, "m", tokenizer=None)


def requests(spec, body_):
    return asyncio.run(spec.requests(call(body_)))


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
    with pytest.raises(BodyError, match="response_format.type"):
        body(oa.ChatBody, messages=[{"role": "user", "content": "x"}], response_format={"type": "xml"})
    [req] = requests(oa.Completions(), body(oa.CompletionBody, prompt=["only"], stop="\n", temperature=0))
    assert req.prompt == "only" and req.params.stop == ["\n"] and req.params.max_new_tokens == 16
    assert req.params.do_sample is False
    [ids] = requests(oa.Completions(), body(oa.CompletionBody, prompt=[5, 6, 7]))
    assert ids.prompt_ids == [5, 6, 7] and ids.prompt is None
    assert len(requests(oa.Completions(), body(oa.CompletionBody, prompt="x", n=3, seed=1))) == 3


class _Template:
    """A tokenizer whose chat template records what it was asked to render."""

    def __init__(self, fail: bool = False) -> None:
        self.seen, self.fail = None, fail

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        if self.fail:
            raise ValueError("no template")
        self.seen = messages
        return "<rendered>"


def test_openai_chat_passes_template_text_and_prefers_max_completion_tokens():
    tok = _Template()
    b = body(oa.ChatBody, messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}]},
                                    {"role": "user", "content": "b"}],
             max_tokens=5, max_completion_tokens=9, temperature=0.5, seed=3, top_k=-1)
    [req] = asyncio.run(oa.Chat().requests(Call(b, "t", DEFAULTS, "m", tok)))
    assert tok.seen == [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert req.prompt == "<rendered>" and req.prompt_ids is None and req.special_tokens is False
    assert req.params.max_new_tokens == 9 and req.params.top_k == 0
    assert req.params.do_sample is True and req.params.seed == 3
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(oa.Chat().requests(Call(b, "t", DEFAULTS, "m", _Template(fail=True))))
    assert err.value.param == "messages"


def test_openai_chat_chunks():
    f = oa.OpenAIShapes(chat=True, model="m", include_usage=True)
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
    [t] = requests(takeoff.Takeoff(), body(takeoff.TakeoffBody, text="x", sampling_topk=3, max_new_tokens=4))
    assert (t.prompt, t.params.top_k, t.params.max_new_tokens) == ("x", 3, 4)
    [r] = requests(truss.Truss(), body(truss.TrussBody, prompt="y", stream=True, max_new_tokens=5))
    assert (r.prompt, r.params.max_new_tokens) == ("y", 5)
    [r2] = requests(truss.Truss(), body(truss.TrussBody, prompt="y", max_tokens=7))
    assert r2.params.max_new_tokens == 7  # the alias in the field table
    [g] = requests(together.Together(), body(together.InferenceBody, prompt="z", stop="##", max_tokens=6,
                                             temperature=0.7, model="any"))
    assert (g.params.stop, g.params.max_new_tokens, g.params.do_sample) == (["##"], 6, True)
    [v] = requests(generic_v1.GenericV1(), body(generic_v1.GenerateBody, prompt="w", maxTokens=2))
    assert v.params.max_new_tokens == 2


def test_truss_reads_api_key_as_bearer():
    auth = truss.Truss.authorization
    assert auth("Api-Key abc") == "Bearer abc"
    assert auth("Bearer abc") == "Bearer abc"
    assert auth(None) is None


class FakeStream:
    """A stand-in for the engine's RequestStream: the given deltas, then an optional exception."""

    def __init__(self, exc: Exception | None, *items: Delta) -> None:
        self.exc, self.items, self.cancelled = exc, items, False

    async def _gen(self):
        for d in self.items:
            yield d
        if self.exc is not None:
            raise self.exc

    def __aiter__(self):
        return self._gen()

    def cancel(self) -> None:
        self.cancelled = True


def frames(spec, streams, body_=None) -> list[bytes]:
    return drain(spec.frames(call(body_), streams))


def test_together_and_generic_events():
    state: dict = {}
    ev = together.Together().event(None, None, Delta(text=" a"), state)
    assert ev == {"choices": [{"text": " a"}], "result_type": "language-model-inference", "id": state["id"]}
    assert together.Together().event(None, None, Delta(), state) is None
    g, state = generic_v1.GenericV1(), {"id": "gen_1"}
    assert g.event(None, None, Delta(text="Once"), state) == {"id": "gen_1", "text": "Once", "delta": "Once"}
    assert g.event(None, None, Delta(text=" upon"), state) == {"id": "gen_1", "text": "Once upon", "delta": " upon"}
    assert g.event(None, None, Delta(finish_reason="stop"), state)["finishReason"] == "stop"


# --- the streamed answer's error path ----------------------------------------------------------
def test_an_exception_mid_stream_is_an_error_event_then_the_normal_end():
    out = frames(generic_v1.GenericV1(), [FakeStream(RuntimeError("boom"), Delta(text="a"))])
    assert json.loads(out[0][6:])["delta"] == "a"
    assert json.loads(out[1][6:])["error"] == {"type": "internal_error", "message": "RuntimeError: boom"}
    assert out[2] == SSE_DONE and len(out) == 3


def test_an_engine_error_delta_is_an_error_line_in_a_raw_stream():
    failed = Delta(text="b", finish_reason="error", error="oom")
    out = frames(takeoff.Takeoff(), [FakeStream(None, Delta(text="a"), failed)])
    assert out[:2] == [b"a", b"b"] and b'"message": "oom"' in out[2] and len(out) == 3


def test_the_stream_is_cancelled_when_the_client_goes_away():
    s = FakeStream(None, Delta(text="a"), Delta(text="b"))

    async def run():
        gen = takeoff.Takeoff().frames(call(None), [s])
        assert await gen.__anext__() == b"a"
        await gen.aclose()

    asyncio.run(run())
    assert s.cancelled


def test_openai_fork_needs_a_request_id_and_reaches_the_engine():
    with pytest.raises(BodyError) as err:
        body(oa.CompletionBody, prompt="x", parent_request_id="p")
    assert err.value.param == "parent_request_id"
    [req] = requests(oa.Completions(), body(oa.CompletionBody, prompt="x", request_id="c", parent_request_id="p"))
    assert (req.request_id, req.parent_request_id, req.named) == ("c", "p", True)


def test_every_stateless_dialect_forks_with_parent_request_id():
    cases = [(takeoff.Takeoff(), takeoff.TakeoffBody, {"text": "x"}),
             (truss.Truss(), truss.TrussBody, {"prompt": "x"}),
             (together.Together(), together.InferenceBody, {"prompt": "x"}),
             (generic_v1.GenericV1(), generic_v1.GenerateBody, {"prompt": "x"})]
    for spec, model, fields in cases:
        [req] = requests(spec, body(model, **fields, request_id="child", parent_request_id="parent"))
        assert (req.request_id, req.parent_request_id) == ("child", "parent"), spec.name
        with pytest.raises(BodyError) as err:
            requests(spec, body(model, **fields, parent_request_id="parent"))
        assert err.value.param == "parent_request_id", spec.name

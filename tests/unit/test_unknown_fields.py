"""Every dialect refuses fields it does not take, by name — except the few its real clients send that
change nothing (each spec's ACCEPTED, with why) — and the seed clients' bodies still parse as they
are (../shared/seeds: request-id API, Takeoff, Together, Truss, generic v1)."""

from __future__ import annotations

import json

import pytest

from model.types import InvalidRequest
from protocol import openai as oa, responses, takeoff
from protocol.common import BodyError, parse_json
from protocol.dialects import DIALECTS
from protocol.request_id import BatchBody, GenerateBody

ROUTES = [(spec, route) for spec in DIALECTS for route in spec.routes]


def parse(spec, body: dict):
    return parse_json(json.dumps(body).encode(), spec.body)


@pytest.mark.parametrize("spec, route", ROUTES, ids=[r.path for _, r in ROUTES])
def test_every_route_example_parses_and_an_unknown_field_is_refused_by_name(spec, route):
    assert route.example, f"{route.path} has no example body"
    parse(spec, dict(route.example))
    with pytest.raises(BodyError) as exc:
        parse(spec, {**route.example, "zz_unknown": 1, "zz_other": 2})
    assert exc.value.param == "zz_unknown" and exc.value.message.startswith("zz_unknown, zz_other: unknown fields")


def test_a_field_of_generation_config_at_the_top_level_is_refused_and_pointed_there():
    with pytest.raises(BodyError) as exc:
        parse_json(b'{"request_id": "a", "prompt": "x", "max_new_tokens": 3}', GenerateBody)
    assert exc.value.param == "max_new_tokens" and "belongs in generation_config" in exc.value.message


@pytest.mark.parametrize("spec_body, accepted", [
    (oa.ChatBody, oa.ACCEPTED), (oa.CompletionBody, oa.ACCEPTED), (responses.ResponsesBody, responses.ACCEPTED),
    (takeoff.TakeoffBody, takeoff.ACCEPTED)])
def test_accepted_fields_are_taken_and_each_says_why(spec_body, accepted):
    base = {oa.ChatBody: {"messages": [{"role": "user", "content": "x"}]}, oa.CompletionBody: {"prompt": "x"},
            responses.ResponsesBody: {"input": "x"}, takeoff.TakeoffBody: {"text": "x"}}[spec_body]
    values = {"metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True,
              "prompt_cache_key": "k", "safety_identifier": "u", "consumer_group": "primary"}
    for name, why in accepted.items():
        assert len(why) > 20, f"{name}: say why it is harmless"
        parse_json(json.dumps({**base, name: values[name]}).encode(), spec_body)


def test_noop_values_are_taken_others_refused():
    chat = {"messages": [{"role": "user", "content": "x"}]}
    parse_json(json.dumps({**chat, "store": False, "best_of": 1, "tools": [], "tool_choice": "none"}).encode(),
               oa.ChatBody)
    # A tool without its function is malformed (tools are honoured, so the error names the part).
    for field, value, param in [("store", True, "store"), ("best_of", 2, "best_of"),
                                ("tools", [{"type": "function"}], "tools.0.function")]:
        with pytest.raises(BodyError) as exc:
            parse_json(json.dumps({**chat, field: value}).encode(), oa.ChatBody)
        assert exc.value.param == param
    together = next(s for s in DIALECTS if s.name == "together").body
    parse_json(b'{"prompt": "x", "logprobs": null, "safety_model": null}', together)
    with pytest.raises(BodyError, match="logprobs"):
        parse_json(b'{"prompt": "x", "logprobs": 1}', together)


def test_an_sdk_message_object_sent_back_is_taken_when_its_extra_fields_are_empty():
    sent_back = {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "audio": None,
                 "function_call": None, "tool_calls": None}
    body = parse_json(json.dumps({"messages": [{"role": "user", "content": "x"}, sent_back]}).encode(), oa.ChatBody)
    assert body.messages[1].text() == "hi"
    with pytest.raises(BodyError) as exc:
        parse_json(json.dumps({"messages": [{**sent_back, "tool_calls": [{"id": "c"}]}]}).encode(), oa.ChatBody)
    assert exc.value.param == "messages.0.tool_calls.0.function"  # tool calls are honoured: the malformed part is named


# The seeds' bodies, as their documents write them (../shared/seeds/*.txt).
SEED_GENERATION_CONFIG = {"num_beams": 1, "do_sample": True, "temperature": 1, "top_p": 1, "top_k": 50,
                          "max_new_tokens": 2048, "repetition_penalty": 1, "length_penalty": 1}
SEEDS = [
    ("/api/generate", {"request_id": "YmFzZTY0", "prompt": "[INST] Generate a very long poem about 1000 cats [/INST]\n\n",
                       "only_new_tokens": True, "stream_response": True, "generation_config": SEED_GENERATION_CONFIG}),
    ("/generate_stream", {"text": "List 3 things to do in London"}),
    ("/generate", {"text": "List 3 things to do in London."}),
    ("/inference", {"model": "togethercomputer/RedPajama-INCITE-7B-Instruct", "prompt": "Alan Turing was",
                    "max_tokens": 128, "stop": ["\n\n"], "temperature": 0.7, "top_p": 0.7, "top_k": 50,
                    "repetition_penalty": 1, "stream_tokens": True}),
    ("/predict", {"prompt": "What is the Mistral wind?", "stream": True, "max_new_tokens": 4096}),
    ("/v1/generate/stream", {"prompt": "Tell me a story", "maxTokens": 500, "temperature": 0.8}),
]


@pytest.mark.parametrize("path, seed", SEEDS, ids=[p for p, _ in SEEDS])
def test_seed_bodies_parse_unchanged(path, seed):
    spec = next(s for s, r in ROUTES if r.path == path)
    parse(spec, seed)


def test_seed_batch_body_parses_unchanged():
    parse_json(json.dumps({"prompts": [{"request_id": "YmFzZTY0", "prompt": "cats"}, {"request_id": "rFERfgE",
                                                                                    "prompt": "dogs"}],
                           "only_new_tokens": False, "generation_config": SEED_GENERATION_CONFIG}).encode(), BatchBody)


def test_an_engine_error_names_the_field_the_body_set():
    def exc():
        return InvalidRequest("generation_config.max_new_tokens must be between 1 and 9, got 99",
                              param="max_new_tokens")
    sent = parse_json(b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99}', oa.ChatBody)
    assert oa.Chat().renamed(exc(), sent).param == "max_tokens"
    sent = parse_json(b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99}', oa.ChatBody)
    assert oa.Chat().renamed(exc(), sent).param == "max_completion_tokens"
    # A body error already names the body's own field: "prompt" sent to Takeoff stays "prompt".
    assert takeoff.Takeoff().renamed(BodyError("prompt: unknown field", param="prompt")).param == "prompt"

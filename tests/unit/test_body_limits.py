"""Bodies of any shape get a typed 4xx error, never an exception the server would turn into a 500."""

from __future__ import annotations

import json

import pytest

from protocol.common import (
    MAX_ARRAY_ITEMS, MAX_DEPTH, BodyError, UnsupportedMediaType, check_content_type, parse_json,
)
from protocol.openai import ChatBody, CompletionBody
from protocol.request_id import GenerateBody
from server.http import http_status


def test_thousands_of_levels_is_a_body_error_not_a_recursion_error():
    raw = b'{"request_id": "a", "prompt": "x", "generation_config": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(BodyError, match="nested deeper"):
        parse_json(raw, GenerateBody)
    raw = b'{"a": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001
    with pytest.raises(BodyError, match="nested deeper"):
        parse_json(raw, GenerateBody)


def test_depth_limit_names_the_path():
    deep: object = 1
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(BodyError) as e:
        parse_json(json.dumps({"model": "m", "prompt": "x", "logit_bias": deep}).encode(), CompletionBody)
    assert e.value.param.startswith("logit_bias") and http_status(e.value) == 400
    # A body at the limit's edge still parses as far as validation.
    ok: object = 1
    for _ in range(MAX_DEPTH - 2):
        ok = [ok]
    with pytest.raises(BodyError) as e:
        parse_json(json.dumps({"prompt": "x", "request_id": ok}).encode(), GenerateBody)
    assert "nested" not in e.value.message


def test_long_array_is_refused_with_its_field():
    raw = json.dumps({"prompt": [1] * (MAX_ARRAY_ITEMS + 1)}).encode()
    with pytest.raises(BodyError, match="array of") as e:
        parse_json(raw, CompletionBody)
    assert e.value.param == "prompt"


def test_non_utf8_bytes_and_lone_surrogates():
    with pytest.raises(BodyError, match="not UTF-8"):
        parse_json(b'{"request_id": "a", "prompt": "\xff\xfe caf\xe9"}', GenerateBody)
    with pytest.raises(BodyError, match="not UTF-8"):
        parse_json('{"prompt": "x"}'.encode("utf-16"), GenerateBody)
    with pytest.raises(BodyError, match="surrogate") as e:
        parse_json(b'{"request_id": "a", "prompt": "bad \\ud800 half"}', GenerateBody)
    assert e.value.param == "prompt"
    with pytest.raises(BodyError, match="surrogate"):
        parse_json(b'{"messages": [{"role": "user", "content": "\\udfff"}]}', ChatBody)
    # A proper pair is text and passes.
    body = parse_json(b'{"request_id": "a", "prompt": "cat \\ud83d\\ude00"}', GenerateBody)
    assert body.prompt == "cat \U0001F600"


def test_not_an_object_and_malformed():
    for raw in (b"[]", b"1", b'"x"', b"", b"null"):
        with pytest.raises(BodyError, match="JSON object"):
            parse_json(raw, GenerateBody)
    with pytest.raises(BodyError, match="not valid JSON"):
        parse_json(b'{"prompt": ', GenerateBody)


@pytest.mark.parametrize("header", [None, "application/json", "application/json; charset=utf-8",
                                    "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                    "application/vnd.api+json"])
def test_json_like_content_types_pass(header):
    check_content_type(header)


@pytest.mark.parametrize("header", ["multipart/form-data; boundary=x", "application/xml", "text/html",
                                    "application/json; charset=latin-1", "image/png"])
def test_other_content_types_are_415(header):
    with pytest.raises(UnsupportedMediaType) as e:
        check_content_type(header)
    assert http_status(e.value) == 415 and e.value.param == "Content-Type"

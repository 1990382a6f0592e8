"""The Responses API in process (the real app, engine and disk store behind FastAPI's TestClient,
driven by the official `openai` SDK): validation and error shapes, store: false, input_items
paging, deletion, and continuing a response whose KV is gone but whose text is stored."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

BRIEF = "Answer briefly."


@pytest.fixture(scope="module")
def app_client(tiny_model_dir, tmp_path_factory):
    from config import Settings
    from server import build_app
    from server.runtime import Runtime

    settings = Settings(model=str(tiny_model_dir), cache_url=f"disk://{tmp_path_factory.mktemp('kv')}",
                        num_threads=1, cache_block_tokens=8, api_keys="")
    rt = Runtime.start(settings)
    app = build_app()
    app.state.runtime = rt
    with TestClient(app) as tc:
        yield tc, rt
    rt.close()


@pytest.fixture(scope="module")
def client(app_client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=app_client[0],
                         max_retries=0)


def ask(client: openai.OpenAI, text, previous=None, **kw):
    return client.responses.create(model="m", input=text, previous_response_id=previous, instructions=BRIEF,
                                   max_output_tokens=kw.pop("max_output_tokens", 12), temperature=0, **kw)


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"background": True, "store": False}, "background"),  # a background response must be stored
    ({"conversation": "conv_1"}, "conversation"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"request_id": "conv-1"}, "request_id"),
    ({"min_tokens": 9, "max_output_tokens": 4}, "min_tokens"),
])
def test_unsupported_or_bad_fields_are_400_naming_the_field(client, extra, param):
    body = {"model": "m", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body=body, cast_to=dict)
    err = e.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] and err["message"]


@pytest.mark.parametrize("input_, param", [
    ([{"type": "computer_call", "call_id": "c"}], "input.0.type"),
    ([{"type": "function_call_output", "call_id": "c"}], "input.0.output"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}], "input.0.content.0.type"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "input.1.role"),
    ([{"role": "user", "content": [{"type": "input_text"}]}], "input.0.content.0.text"),
    ([], "input"),
    (None, "input"),
    (7, "input"),
])
def test_bad_input_items_name_the_item(client, input_, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body={"model": "m", "input": input_}, cast_to=dict)
    assert e.value.body["param"] == param, e.value.body


def test_missing_input_and_malformed_json(app_client):
    tc, _ = app_client
    r = tc.post("/v1/responses", json={"model": "m"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = tc.post("/v1/responses", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_no_op_values_of_refused_fields_are_accepted(client):
    r = client.responses.create(model="m", input="hi", max_output_tokens=4, tools=[], tool_choice="auto",
                                truncation="disabled", text={"format": {"type": "text"}}, parallel_tool_calls=True,
                                metadata={"topic": "cats"}, user="u-1", temperature=0)
    assert r.status in ("completed", "incomplete") and r.metadata == {"topic": "cats"} and r.user == "u-1"


def test_prompt_past_the_context_is_400_on_input(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", input="cats and dogs " * 2000, max_output_tokens=4)
    assert e.value.body["param"] == "input" and "context" in e.value.body["message"]


def test_unknown_previous_response_id_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "hi", previous="resp_nope")
    assert e.value.body["param"] == "previous_response_id" and e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_nope")


def test_response_object_fields(client):
    r = ask(client, "Tell me about cats", metadata={"a": "b"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "kvbento-tiny"
    assert r.instructions == BRIEF and r.previous_response_id is None and r.metadata == {"a": "b"}
    assert len(r.output) == 1 and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text" and r.output_text == r.output[0].content[0].text
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens_details.reasoning_tokens == 0
    assert u.output_tokens <= 12
    if r.status == "incomplete":
        assert u.output_tokens == 12 and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()


def test_answers_validate_strictly_against_the_sdk_types(app_client):
    from openai.types.responses import Response, ResponseItemList

    tc, _ = app_client
    body = {"model": "m", "input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "max_output_tokens": 4}
    r = tc.post("/v1/responses", json=body)
    assert r.status_code == 200 and r.headers["X-KV-Cache"]
    resp = Response.model_validate(r.json())  # every required field present, of the right type
    items = ResponseItemList.model_validate(tc.get(f"/v1/responses/{resp.id}/input_items").json())
    assert [i.role for i in items.data] == ["assistant", "user"]
    assert Response.model_validate(tc.get(f"/v1/responses/{resp.id}").json()) == resp
    d = tc.delete(f"/v1/responses/{resp.id}")
    assert d.status_code == 200 and d.json() == {"id": resp.id, "object": "response", "deleted": True}


def test_continuation_reuses_the_parent_and_instructions_are_not_carried(client):
    r1 = ask(client, "Tell me about cats")
    r2 = ask(client, "And dogs?", r1.id)
    assert r2.previous_response_id == r1.id
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.total_tokens - 8
    # Without the instructions the conversation starts differently: nothing of it is reused.
    r3 = client.responses.create(model="m", input="And dogs?", previous_response_id=r1.id, max_output_tokens=4,
                                 temperature=0)
    assert r3.instructions is None and r3.usage.input_tokens < r2.usage.input_tokens


def test_streamed_events_are_in_order_and_match_the_answer(client):
    r1 = ask(client, "Tell me about cats")
    events = list(ask(client, "And dogs?", r1.id, stream=True))
    types = [e.type for e in events]
    end = types[-1]
    assert end in ("response.completed", "response.incomplete")
    n = types.count("response.output_text.delta")
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * n + [
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", end]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == events[-4].text and final.previous_response_id == r1.id
    assert final.usage.input_tokens_details.cached_tokens >= r1.usage.total_tokens - 8
    # Same as not streamed (greedy), and what retrieve answers.
    assert ask(client, "And dogs?", r1.id).output_text == text
    assert client.responses.retrieve(final.id).output_text == text


def test_store_false_keeps_nothing(client):
    r = ask(client, "Tell me about cats", store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "more", r.id)
    assert e.value.body["param"] == "previous_response_id"
    # store: false can still continue a stored response.
    parent = ask(client, "Tell me about cats")
    child = ask(client, "And dogs?", parent.id, store=False)
    assert child.usage.input_tokens_details.cached_tokens >= parent.usage.total_tokens - 8


def test_input_items_are_paged_like_openai(client):
    msgs = [{"role": "developer", "content": "d"}, {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
            {"role": "user", "content": "c"}]
    r = client.responses.create(model="m", input=msgs, max_output_tokens=4)
    desc = client.responses.input_items.list(r.id)
    assert [i.role for i in desc.data] == ["user", "assistant", "user", "developer"]
    assert desc.data[0].content[0].text == "c" and desc.data[1].content[0].type == "output_text"
    asc = client.responses.input_items.list(r.id, order="asc", limit=2)
    assert [i.role for i in asc.data] == ["developer", "user"] and asc.has_more
    rest = client.responses.input_items.list(r.id, order="asc", after=asc.last_id)
    assert [i.content[0].text for i in rest.data] == ["b", "c"] and not rest.has_more
    assert [i.id for i in asc.data + rest.data] == [i.id for i in reversed(desc.data)]
    # The SDK's auto-paging walks every page.
    assert len(list(client.responses.input_items.list(r.id, limit=1))) == 4
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_items.list(r.id, limit=101)
    assert e.value.body["param"] == "limit"


def test_delete_removes_the_response_and_its_head(client, app_client):
    _, rt = app_client
    r = ask(client, "Tell me about cats")
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "more", r.id)
    assert e.value.body["param"] == "previous_response_id"
    head = app_client[0].portal.call(rt.store.load_head, "public", r.id)
    assert head.head is None


def test_evicted_kv_is_recomputed_from_the_stored_text(client, app_client):
    _, rt = app_client
    kept = ask(client, "Tell me about cats", max_output_tokens=16)
    lost = ask(client, "Tell me about cats", max_output_tokens=16)
    assert lost.output_text == kept.output_text
    app_client[0].portal.call(rt.store.delete, "public", lost.id)  # the head only: the record stays
    a = ask(client, "And dogs?", kept.id, max_output_tokens=16)
    b = ask(client, "And dogs?", lost.id, max_output_tokens=16)
    assert b.output_text == a.output_text and b.previous_response_id == lost.id


@pytest.mark.redis
def test_store_down_parent_is_503_and_new_answers_are_not_stored(tiny_model_dir, redis_server_factory):
    from config import Settings
    from server import build_app
    from server.runtime import Runtime

    redis = redis_server_factory()
    rt = Runtime.start(Settings(model=str(tiny_model_dir), cache_url=redis.url, cache_timeout=1, num_threads=1,
                                api_keys=""))
    app = build_app()
    app.state.runtime = rt
    try:
        with TestClient(app) as tc:
            c = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=tc, max_retries=0)
            r1 = ask(c, "Tell me about cats")
            redis.kill()
            with pytest.raises(openai.InternalServerError) as e:
                ask(c, "And dogs?", r1.id)
            assert e.value.status_code == 503 and e.value.body["type"] == "unavailable_error"
            alone = ask(c, "And dogs?")  # no parent to read: answered, just not kept
            assert alone.output_text and alone.status in ("completed", "incomplete")
            assert alone.usage.input_tokens_details.cache_write_tokens == 0
            assert tc.get(f"/v1/responses/{alone.id}").status_code == 503
    finally:
        rt.close()


def test_a_record_of_another_model_continues_from_its_text_alone(client, app_client):
    import json as _json

    from cache import keys
    from session.responses import ResponseStore

    tc, rt = app_client
    r = ask(client, "Tell me about cats")
    key = keys.response_key("public", r.id)
    rec = _json.loads(bytes(rt.store.backend.get(key)))
    responses = ResponseStore(rt.store)
    assert tc.portal.call(responses.load, "public", r.id).token_ids  # this model's ids are kept
    rec["fingerprint"] = "another-model"
    rt.store.backend.set(key, _json.dumps(rec).encode())
    tc.portal.call(rt.store.delete, "public", r.id)  # and its head is gone
    assert tc.portal.call(responses.load, "public", r.id).token_ids == []
    child = ask(client, "And dogs?", r.id)  # recomputed from the text: answered, not refused
    assert child.status in ("completed", "incomplete") and child.output_text
    rt.store.backend.set(key, b"{not json")  # a damaged record is absent, never a 500
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)

"""The OpenAI Responses API across replicas: the official `openai` SDK drives a four-turn
conversation with previous_response_id, alternating two `bentoml serve` replicas that share a real
Redis. Every turn reuses the whole previous sequence, the streams parse in order, retrieve /
input_items / delete work anywhere, greedy text equals a one-replica run, and tenants are apart."""

from __future__ import annotations

import itertools

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.slow]

KEY_A, KEY_B = "resp-key-alpha", "resp-key-bravo"
INSTRUCTIONS = "You are a terse assistant."
TURNS = ["Tell me about cats.", "And dogs?", "Which one is easier to keep?", "Thanks, summarise."]
MAX_TOKENS = 24
ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def replicas(redis_pair):
    return redis_pair  # its keys are KEY_A and KEY_B (tests/e2e/conftest.py)


def sdk(server, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def check_events(events: list) -> openai.types.responses.Response:
    """The events of one streamed response are complete and in OpenAI's order; its Response."""
    types = [e.type for e in events]
    end = types[-1]
    assert end in ("response.completed", "response.incomplete"), types
    n = types.count("response.output_text.delta")
    assert types == ORDER + ["response.output_text.delta"] * n + TAIL + [end]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert all(e.item_id == final.output[0].id for e in events if e.type == "response.output_text.delta")
    return final


def turn(client: openai.OpenAI, k: int, previous: str | None, mode: str) -> openai.types.responses.Response:
    """Turn k, sent as a plain call, a stream=True iteration or the SDK's stream helper."""
    kw = {"model": "kvbento", "input": TURNS[k], "instructions": INSTRUCTIONS, "previous_response_id": previous,
          "max_output_tokens": MAX_TOKENS, "temperature": 0}
    if mode == "create":
        return client.responses.create(**kw)
    if mode == "stream":
        return check_events(list(client.responses.create(stream=True, **kw)))
    with client.responses.stream(**kw) as st:
        events = list(st)
    final = check_events(events)
    # The helper's running snapshot of the text, accumulated from the deltas.
    assert [e.snapshot for e in events if e.type == "response.output_text.delta"][-1] == final.output_text
    if final.status == "completed":
        assert st.get_final_response().output_text == final.output_text
    return final


def conversation(clients: list[openai.OpenAI]) -> list:
    modes = ["create", "stream", "helper", "create"]
    out, prev = [], None
    for k in range(len(TURNS)):
        r = turn(clients[k % len(clients)], k, prev, modes[k])
        out.append(r)
        prev = r.id
    return out


def test_four_turns_across_replicas(replicas):
    a, b = sdk(replicas[0]), sdk(replicas[1])
    turns = conversation([a, b])
    for k, r in enumerate(turns):
        assert r.status in ("completed", "incomplete") and r.output_text, (k, r)
        assert r.previous_response_id == (turns[k - 1].id if k else None)
        assert r.instructions == INSTRUCTIONS
        if k:
            prev = turns[k - 1].usage
            # The whole previous sequence (its input and its answer) is restored, not prefilled.
            assert r.usage.input_tokens_details.cached_tokens >= prev.total_tokens - 16, (k, r.usage, prev)
            assert r.usage.input_tokens > prev.total_tokens
    # Greedy text equals the same conversation on one replica (another tenant: no shared blocks).
    alone = conversation([sdk(replicas[0], KEY_B)])
    assert [r.output_text for r in alone] == [r.output_text for r in turns]

    # Retrieve and list on the replica that did not answer.
    last = turns[-1]
    other = [b, a][(len(TURNS) - 1) % 2]
    got = other.responses.retrieve(last.id)
    assert got.id == last.id and got.output_text == last.output_text and got.usage == last.usage
    items = other.responses.input_items.list(turns[1].id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", TURNS[1])]

    # Tenants: key B cannot read, continue or delete key A's responses.
    bb = sdk(replicas[1], KEY_B)
    with pytest.raises(openai.NotFoundError):
        bb.responses.retrieve(last.id)
    with pytest.raises(openai.NotFoundError) as e:
        bb.responses.create(model="kvbento", input="hi", previous_response_id=last.id, max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        bb.responses.delete(last.id)

    # Delete on one replica: continuing from it is a 404 on the other; its parent still continues.
    a.responses.delete(turns[2].id)
    with pytest.raises(openai.NotFoundError) as e:
        b.responses.create(model="kvbento", input="more", previous_response_id=turns[2].id, max_output_tokens=4)
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(turns[2].id)
    fork = b.responses.create(model="kvbento", input=TURNS[2], instructions=INSTRUCTIONS,
                              previous_response_id=turns[1].id, max_output_tokens=MAX_TOKENS, temperature=0)
    assert fork.output_text == turns[2].output_text
    assert fork.usage.input_tokens_details.cached_tokens >= turns[1].usage.total_tokens - 16
    assert a.responses.retrieve(turns[3].id).output_text == turns[3].output_text


def test_without_auth_is_401(replicas):
    with pytest.raises(openai.AuthenticationError):
        sdk(replicas[0], "wrong-key").responses.create(model="kvbento", input="hi", max_output_tokens=4)


def test_bench_responses_turns_runs(replicas):
    from bench.responses_turns import run_responses_turns, table

    rows = run_responses_turns(replicas[0].url, 3, turn_words=40, n_out=8, api_key=KEY_A)
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert all(r["chained_ok"] and r["resent_ok"] for r in rows), rows
    for prev, r in itertools.pairwise(rows):
        # Both variants see a conversation of the same size (the resent answers are re-tokenized
        # text); the chained one restores all of its previous sequence.
        assert abs(r["chained_input_tokens"] - r["resent_input_tokens"]) <= 8
        assert r["chained_cached_tokens"] >= prev["chained_input_tokens"] + 8 - 16
    assert table(rows).count("\n") == 4


def test_continues_on_a_replica_started_after_the_answer(replicas):
    server = replicas[0]
    r1 = turn(sdk(server), 0, None, "create")
    server.stop()  # the process that answered is gone: only Redis holds the conversation
    server.start()  # a new process, started after the answer
    r2 = turn(sdk(server), 1, r1.id, "stream")
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.total_tokens - 16
    assert sdk(server).responses.retrieve(r1.id).output_text == r1.output_text

"""Background responses (``background: true``) on real servers, through the official ``openai`` SDK:
create, retrieve until done, replay and follow from ``starting_after``, cancel, bad input, a client
that reconnects ten times, a disk-store server restarted mid-generation and, on Redis, the replica
running a response SIGKILLed mid-generation while the other one finishes it.

Leases are 2 s here so takeovers happen within seconds. Greedy, ``ignore_eos`` answers of up to
2000 tokens keep a response running long enough to be cut (no sleeps slow anything down).
"""

from __future__ import annotations

import uuid

import openai
import pytest
import requests
from openai import OpenAI

from tests.e2e.polling import read_running, wait_done

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY_A, KEY_B = "key-alpha-0001", "key-bravo-0002"
LEASE = {"KVBENTO_LEASE_SECONDS": "2", "KVBENTO_API_KEYS": f"{KEY_A},{KEY_B}"}
LONG = 2000


def client(server, key: str = KEY_A) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(text: str, n: int) -> dict:
    return dict(model="kvbento", input=text, max_output_tokens=n, temperature=0, extra_body={"ignore_eos": True})


def _auth(c: OpenAI) -> dict:
    return {"Authorization": f"Bearer {c.api_key}"}


def norm(event) -> tuple:
    """What must be identical between two runs of the same greedy response (ids and times differ)."""
    e = event.model_dump() if hasattr(event, "model_dump") else event
    resp = e.get("response") or {}
    out = resp.get("output") or []
    text = out[0]["content"][0]["text"] if out and out[0].get("content") else None
    usage = resp.get("usage") or {}
    return (e["type"], e["sequence_number"], e.get("delta"), e.get("text"), resp.get("status"), text,
            usage.get("output_tokens"))


@pytest.fixture(scope="module")
def srv(server_factory):
    return server_factory(LEASE)


@pytest.fixture(scope="module")
def reference(srv):
    """An uninterrupted background run of the long answer: every event, in order."""
    c = client(srv)
    events = list(c.responses.create(background=True, stream=True, **ask("Tell me a long story", LONG)))
    assert events[-1].type == "response.incomplete"
    return [norm(e) for e in events]


def test_create_retrieve_replay_and_cancel(srv):
    c = client(srv)
    r = c.responses.create(background=True, **ask("Write a poem about cats", 200))
    assert r.background is True and r.status in ("queued", "in_progress") and r.output_text == ""
    done = wait_done(c, r.id)
    fg = c.responses.create(**ask("Write a poem about cats", 200))
    assert done.status == "incomplete" and done.output_text == fg.output_text
    assert done.usage.output_tokens == 200 and done.usage.input_tokens == fg.usage.input_tokens
    everything = list(c.responses.retrieve(r.id, stream=True))
    assert [e.sequence_number for e in everything] == list(range(len(everything)))
    assert everything[0].type == "response.created" and everything[-1].type == "response.incomplete"
    assert "".join(e.delta for e in everything if e.type == "response.output_text.delta") == done.output_text
    tail = list(c.responses.retrieve(r.id, stream=True, starting_after=7))
    assert [norm(e) for e in tail] == [norm(e) for e in everything[8:]]
    # Its KV is stored: the next turn restores it.
    nxt = c.responses.create(model="kvbento", input="And dogs?", previous_response_id=r.id, max_output_tokens=4)
    assert nxt.usage.input_tokens_details.cached_tokens >= done.usage.total_tokens - 64
    # Cancel: a finished response is refused, a running one stops and keeps its output.
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(r.id)
    long = c.responses.create(background=True, **ask("Tell me about the sea", LONG))
    cancelled = c.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and len(cancelled.output_text) < 4 * LONG
    again = c.responses.retrieve(long.id)
    assert again.status == "cancelled" and again.output_text == cancelled.output_text
    assert c.responses.cancel(long.id).status == "cancelled"  # cancelling twice answers the same
    replay = list(c.responses.retrieve(long.id, stream=True))
    assert "".join(e.delta for e in replay if e.type == "response.output_text.delta") == cancelled.output_text


def test_bad_input(srv):
    c, other = client(srv), client(srv, KEY_B)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_" + uuid.uuid4().hex)
    with pytest.raises(openai.NotFoundError):
        c.responses.cancel("resp_" + uuid.uuid4().hex)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="kvbento", input="x", background=True, store=False)
    assert e.value.body["param"] == "background"
    r = c.responses.create(background=True, **ask("Short", 8))
    wait_done(c, r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(r.id)  # another tenant's
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    n = len(list(c.responses.retrieve(r.id, stream=True)))
    url, h = f"{srv.url}/v1/responses/{r.id}", _auth(c)
    for bad in ("-1", "-5", str(n), "999999", "x"):
        got = requests.get(url, params={"stream": "true", "starting_after": bad}, headers=h, timeout=30)
        assert got.status_code == 400 and got.json()["error"]["param"] == "starting_after", (bad, got.text)
    assert requests.get(url, params={"stream": "true", "starting_after": str(n - 1)}, headers=h,
                        timeout=30).text == ""  # the last event: nothing after it
    fg = c.responses.create(model="kvbento", input="not background", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(fg.id)
    got = requests.get(f"{srv.url}/v1/responses/{fg.id}", params={"stream": "true"}, headers=h, timeout=30)
    assert got.status_code == 400 and got.json()["error"]["param"] == "stream"


def test_a_client_reconnecting_ten_times_reads_every_event_once(srv, reference):
    c = client(srv)
    r = c.responses.create(background=True, **ask("Tell me a long story", LONG))
    seen: list = []
    for _ in range(10):
        after = seen[-1].sequence_number if seen else None
        kw = {"starting_after": after} if after is not None else {}
        with c.responses.retrieve(r.id, stream=True, **kw) as events:
            for i, e in enumerate(events):
                seen.append(e)
                if i == 20:
                    break  # the connection closes here
    seen += list(c.responses.retrieve(r.id, stream=True, starting_after=seen[-1].sequence_number))
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert [norm(e) for e in seen] == reference


def _cut_and_resume(c_run: OpenAI, kill, c_read: OpenAI, reference) -> None:
    """Start the long answer on ``c_run``'s server, read part of it, ``kill()`` that server
    mid-generation, then read on from ``c_read``'s from the last event seen."""
    r = c_run.responses.create(background=True, **ask("Tell me a long story", LONG))
    seen = read_running(c_run, r.id)
    kill()
    rest = list(c_read.responses.retrieve(r.id, stream=True, starting_after=seen[-1].sequence_number))
    got = [norm(e) for e in seen + rest]
    assert len(seen) + len(rest) == len(reference)
    assert got == reference  # the same text, the same deltas, the same sequence numbers
    assert c_read.responses.retrieve(r.id).status == "incomplete"


def test_disk_store_restart_mid_generation_resumes(server_factory, tmp_path, reference):
    s = server_factory(LEASE, cache_dir=tmp_path / "kv")
    c = client(s)

    def restart() -> None:
        s.kill()
        s.start()

    _cut_and_resume(c, restart, c, reference)
    s.stop()


@pytest.mark.redis
def test_redis_replica_killed_mid_generation_the_other_finishes(server_factory, redis_server_factory, reference):
    redis = redis_server_factory()
    env = {**LEASE, "KVBENTO_CACHE_URL": redis.url, "KVBENTO_CACHE_TIMEOUT": "1"}
    a, b = server_factory(env), server_factory(env)
    _cut_and_resume(client(a), a.kill, client(b), reference)
    metrics = requests.get(b.url + "/metrics", timeout=10).text.splitlines()
    line = next(m for m in metrics if m.startswith('kvbento_background_responses_total{event="taken_over"}'))
    assert float(line.split()[-1]) >= 1, line
    b.stop()

"""Resuming a streamed /api/generate whose client went away (``POST /api/generate/resume``), on a
real server: the text before the disconnect plus the resumed text is an uninterrupted greedy run's,
byte for byte; nobody resuming leaves the record the seed API always left (the delivered tokens);
bad input. The grace window is 5 s here, so the no-resume cases settle quickly."""

from __future__ import annotations

import codecs
import time
import uuid

import pytest
import requests

pytestmark = pytest.mark.e2e

KEY_A, KEY_B = "key-alpha-0001", "key-bravo-0002"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
PROMPT = "[INST] Generate a very long poem about 1000 cats [/INST]\n\n"
GRACE = 5


@pytest.fixture(scope="module")
def srv(server_factory):
    """A private server: a short grace window and two tenants of its own."""
    s = server_factory({"KVBENTO_RESUME_GRACE_SECONDS": str(GRACE), "KVBENTO_API_KEYS": f"{KEY_A},{KEY_B}"})
    yield s
    s.stop()


def body(rid: str, n: int, only_new: bool = True) -> dict:
    return {"request_id": rid, "prompt": PROMPT, "stream_response": True, "only_new_tokens": only_new,
            "generation_config": {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n}}


def streamed(srv, rid: str, n: int, only_new: bool = True) -> bytes:
    r = requests.post(srv.url + "/api/generate", json=body(rid, n, only_new), headers=A, timeout=300)
    assert r.status_code == 200, r.text[:300]
    return r.content


def cut_off(srv, rid: str, n: int, chunks: int, only_new: bool = True) -> str:
    """Stream ``rid`` and go away after ``chunks`` chunks; the whole characters received."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = ""
    with requests.post(srv.url + "/api/generate", json=body(rid, n, only_new), headers=A, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200, r.text[:300]
        for i, chunk in enumerate(r.iter_content(chunk_size=None)):
            text += decoder.decode(chunk)  # a character cut in two is left out: the resume sends it
            if i + 1 >= chunks:
                break
    return text


def resume(srv, rid: str, offset, headers=A) -> requests.Response:
    return requests.post(srv.url + "/api/generate/resume", json={"request_id": rid, "offset": offset},
                         headers=headers, timeout=300)


def record(srv, rid: str) -> dict | None:
    """The request_id's record once it is written (the grace window holds it back)."""
    deadline = time.monotonic() + 4 * GRACE + 30
    while time.monotonic() < deadline:
        got = requests.get(f"{srv.url}/api/cache/{rid}", headers=A, timeout=30)
        if got.status_code == 200:
            return got.json()
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("only_new", [True, False])
def test_resumed_text_is_the_uninterrupted_run_byte_for_byte(srv, only_new):
    n = 400
    ref = streamed(srv, "ref-" + uuid.uuid4().hex, n, only_new)
    rid = "rs-" + uuid.uuid4().hex
    before = cut_off(srv, rid, n, chunks=4, only_new=only_new)
    r = resume(srv, rid, len(before))
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"].startswith("text/plain")
    assert before.encode() + r.content == ref
    # Read to the end: the record keeps every generated token.
    info = record(srv, rid)
    assert info is not None and info["tokens"] == info["prompt_tokens"] + n
    # Inside the window the finished text can be read again, from any offset.
    again = resume(srv, rid, 3)
    assert again.status_code == 200 and again.content == ref[len(ref.decode()[:3].encode()):]


def test_a_resume_that_goes_away_again_can_be_resumed(srv):
    n = 400
    ref = streamed(srv, "ref-" + uuid.uuid4().hex, n)
    rid = "rr-" + uuid.uuid4().hex
    got = cut_off(srv, rid, n, chunks=2)
    decoder = codecs.getincrementaldecoder("utf-8")()
    with requests.post(srv.url + "/api/generate/resume", json={"request_id": rid, "offset": len(got)},
                       headers=A, stream=True, timeout=300) as r:
        for i, chunk in enumerate(r.iter_content(chunk_size=None)):
            got += decoder.decode(chunk)
            if i >= 2:
                break
    rest = resume(srv, rid, len(got))
    assert rest.status_code == 200
    assert got.encode() + rest.content == ref


def test_nobody_resumes_the_record_keeps_the_delivered_tokens(srv):
    """The seed API's behaviour: a stream the client cut leaves the prompt and the tokens it got."""
    n = 1500
    rid = "nr-" + uuid.uuid4().hex
    received = cut_off(srv, rid, n, chunks=5)
    info = record(srv, rid)
    assert info is not None, "the cut stream left no record"
    num_generated = info["tokens"] - info["prompt_tokens"]
    assert 1 <= num_generated < n, num_generated
    # Past the window the record answers: the text of the tokens it kept, from the offset.
    kept = resume(srv, rid, len(received))
    assert kept.status_code == 200
    assert received.encode() + kept.content == streamed(srv, "kp-" + uuid.uuid4().hex, num_generated)
    # The record goes on exactly as one greedy run of (kept + 8) tokens.
    cont = requests.post(srv.url + "/api/generate", headers=A, timeout=120, json={
        "request_id": rid, "prompt": "ignored", "stream_response": False, "only_new_tokens": False,
        "generation_config": {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8}})
    assert cont.headers["X-KV-Cache"] == "hit"
    ref = requests.post(srv.url + "/api/generate", headers=A, timeout=120, json={
        "request_id": "fr-" + uuid.uuid4().hex, "prompt": PROMPT, "stream_response": False,
        "only_new_tokens": False, "generation_config": {"do_sample": False, "max_new_tokens": num_generated + 8,
                                                         "min_new_tokens": num_generated + 8}})
    assert cont.json()["response"] == ref.json()["response"]
    assert cont.json()["response"].startswith(PROMPT + received[:20])


def test_a_new_call_ends_the_window_at_once(srv):
    """A client that sends the request_id's next call instead of resuming is not kept waiting for
    the window: the cut stream's record (the delivered tokens) is settled first."""
    rid = "nc-" + uuid.uuid4().hex
    cut_off(srv, rid, 1500, chunks=3)
    nxt = requests.post(srv.url + "/api/generate", headers=A, timeout=120, json={
        "request_id": rid, "prompt": "ignored", "stream_response": True,
        "generation_config": {"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4}})
    assert nxt.status_code == 200 and nxt.headers["X-KV-Cache"] == "hit"
    info = record(srv, rid)
    assert info["tokens"] - info["prompt_tokens"] < 1500


def test_bad_input(srv):
    assert resume(srv, "never-" + uuid.uuid4().hex, 0).status_code == 404
    rid = "bi-" + uuid.uuid4().hex
    with requests.post(srv.url + "/api/generate", json=body(rid, 1500), headers=A, stream=True, timeout=300) as r:
        next(r.iter_content(chunk_size=None))  # running, its client still reading
        neg = resume(srv, rid, -1)
        assert neg.status_code == 400 and neg.json()["error"]["param"] == "offset"
        far = resume(srv, rid, 10**9)
        assert far.status_code == 400 and far.json()["error"]["param"] == "offset", far.text
        other = resume(srv, rid, 0, headers=B)
        assert other.status_code == 404 and other.json()["error"]["param"] == "request_id"
        no_id = requests.post(srv.url + "/api/generate/resume", json={"offset": 0}, headers=A, timeout=30)
        assert no_id.status_code == 400 and no_id.json()["error"]["param"] == "request_id"
        requests.post(f"{srv.url}/api/stop/{rid}", headers=A, timeout=30)


def test_a_stream_that_ends_inside_the_window_keeps_the_delivered_tokens(srv):
    """Nobody resumes a short answer that finishes after its client left: its save waits for the
    window and keeps only what the client got."""
    n = 60
    rid = "ew-" + uuid.uuid4().hex
    cut_off(srv, rid, n, chunks=1)
    info = record(srv, rid)
    assert info is not None
    assert 1 <= info["tokens"] - info["prompt_tokens"] < n

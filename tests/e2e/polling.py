"""Following a background response: waiting for it to end (polling, bounded in time), reading
part of its event stream while it is still running."""

import time

from openai import OpenAI


def wait_done(c: OpenAI, rid: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.responses.retrieve(rid)
        if r.status not in ("queued", "in_progress"):
            return r
        time.sleep(0.2)
    raise AssertionError(f"{rid} still {r.status} after {timeout}s")


def read_running(c: OpenAI, rid: str, count: int = 120) -> list:
    """The first ``count`` events of ``rid``'s stream, checked to be still in progress after them."""
    seen = []
    with c.responses.retrieve(rid, stream=True) as events:
        for e in events:
            seen.append(e)
            if len(seen) == count:
                break
    assert c.responses.retrieve(rid).status == "in_progress"
    return seen

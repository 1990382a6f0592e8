"""Waiting for a background response to end, by polling it (bounded in time)."""

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

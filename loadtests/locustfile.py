"""Locust load test of kvbento: the real traffic shapes, with TTFT and tokens/s as locust entries.

Users (pick with locust's class arguments, default all three by weight):
  StreamingUser   streams /api/generate (plain text) and /v1/chat/completions (OpenAI SSE)
  BatchUser       /api/generate-batch with LOADTEST_BATCH_PROMPTS prompts
  MultiTurnUser   continues its own request_id for LOADTEST_TURNS turns, then starts a new one

Besides each HTTP entry (``POST <route>``: time to response headers), every generation fires
three entries of its own under the same name:
  TTFT   milliseconds to the first generated text (for a batch: to its whole answer)
  E2E    milliseconds to the end of the answer
  TOK/S  output tokens per second of that request, in the "response time" column; its
         "content size" column holds the request's output tokens
A 429 (server full), a 5xx, a transport error or an error event inside a stream is a failure.

Environment (all optional):
  LOADTEST_HOST            http://127.0.0.1:3000 (locust's --host wins)
  LOADTEST_API_KEY         bearer key when the server has KVBENTO_API_KEYS
  LOADTEST_PROMPTS_FILE    one prompt per line (default: a few built-in prompts)
  LOADTEST_MAX_NEW_TOKENS  tokens per generation (32); min_new_tokens is set equal, so every
                           answer has exactly that many tokens (plain-text streams carry no usage)
  LOADTEST_BATCH_PROMPTS   prompts per batch request (4)
  LOADTEST_TURNS           turns per multi-turn conversation (4)
  LOADTEST_WAIT_MIN/MAX    think time between tasks in seconds (0.5 / 1.5)
  LOADTEST_TIMEOUT         seconds one request may take (120)
  LOADTEST_SUMMARY         write a JSON summary here at the end (used by loadtests/run.py)
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

from locust import HttpUser, between, events, task

HOST = os.environ.get("LOADTEST_HOST", "http://127.0.0.1:3000")
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
MAX_NEW_TOKENS = int(os.environ.get("LOADTEST_MAX_NEW_TOKENS", "32"))
BATCH_PROMPTS = int(os.environ.get("LOADTEST_BATCH_PROMPTS", "4"))
TURNS = int(os.environ.get("LOADTEST_TURNS", "4"))
WAIT_MIN = float(os.environ.get("LOADTEST_WAIT_MIN", "0.5"))
WAIT_MAX = float(os.environ.get("LOADTEST_WAIT_MAX", "1.5"))
TIMEOUT = float(os.environ.get("LOADTEST_TIMEOUT", "120"))
SUMMARY = os.environ.get("LOADTEST_SUMMARY", "")
# A stream is read for at most this many chunks/lines: a bound, not a limit a real answer meets.
MAX_CHUNKS = 100_000
CUSTOM_TYPES = ("TTFT", "E2E", "TOK/S")  # our own entries, not HTTP requests
ERROR_MARK = '{"error": {"type": "'  # how the request-id API reports an error inside a stream

_DEFAULT_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain continuous batching to a new engineer.",
    "List three uses of a key-value cache.",
    "What makes a good load test?",
    "Describe the sea in five sentences.",
]


def _prompts() -> list[str]:
    path = os.environ.get("LOADTEST_PROMPTS_FILE")
    if path:
        lines = [l.strip() for l in Path(path).read_text().splitlines() if l.strip()]
        if lines:
            return lines
    return _DEFAULT_PROMPTS


PROMPTS = _prompts()


class _Totals:
    """Run-wide numbers for the JSON summary (one locust process; guarded by a lock)."""

    MAX_SAMPLES = 1_000_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft_ms: list[float] = []
        self.tokens = 0
        self.generations = 0
        self.started = time.time()

    def add(self, ttft_ms: float | None, tokens: int) -> None:
        with self.lock:
            if ttft_ms is not None and len(self.ttft_ms) < self.MAX_SAMPLES:
                self.ttft_ms.append(ttft_ms)
            self.tokens += tokens
            self.generations += 1


TOTALS = _Totals()


@events.test_start.add_listener
def _on_start(**_) -> None:
    TOTALS.started = time.time()


@events.test_stop.add_listener
def _on_stop(environment, **_) -> None:
    if not SUMMARY:
        return
    http = [e for e in environment.stats.entries.values() if e.method not in CUSTOM_TYPES]
    with TOTALS.lock:
        data = {"seconds": time.time() - TOTALS.started, "ttft_ms": list(TOTALS.ttft_ms),
                "output_tokens": TOTALS.tokens, "generations": TOTALS.generations,
                "num_requests": sum(e.num_requests for e in http),
                "num_failures": environment.stats.total.num_failures,
                "failures": [f"{e.method} {e.name}: {e.error} x{e.occurrences}"
                             for e in list(environment.stats.errors.values())[:20]]}
    Path(SUMMARY).write_text(json.dumps(data))


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def _generation_config() -> dict:
    return {"max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": MAX_NEW_TOKENS}


class _KVBentoUser(HttpUser):
    abstract = True
    host = HOST
    wait_time = between(WAIT_MIN, WAIT_MAX)

    def _record(self, name: str, start: float, first: float | None, tokens: int, *,
                streamed: bool = True) -> None:
        """Fire the TTFT / E2E / TOK/S entries of one finished generation."""
        end = time.perf_counter()
        if not streamed:
            first = end  # no stream: the "first token" is the whole answer
        fire = self.environment.events.request.fire
        ttft_ms = None
        if first is not None:
            ttft_ms = (first - start) * 1000
            fire(request_type="TTFT", name=name, response_time=ttft_ms, response_length=0,
                 exception=None, context={})
        fire(request_type="E2E", name=name, response_time=(end - start) * 1000, response_length=0,
             exception=None, context={})
        # A stream's rate is its decode rate after the first token; a non-streamed answer counts whole.
        if streamed and first is not None and tokens > 1 and end > first:
            rate = (tokens - 1) / (end - first)
        else:
            rate = tokens / (end - start) if end > start else 0.0
        fire(request_type="TOK/S", name=name, response_time=rate, response_length=tokens,
             exception=None, context={})
        TOTALS.add(ttft_ms, tokens)

    def _stream_text(self, name: str, body: dict) -> bool:
        """POST a streamed /api/generate; True when it completed without error."""
        start = time.perf_counter()
        first = None
        tail = ""
        with self.client.post("/api/generate", json=body, headers=_headers(), stream=True,
                              catch_response=True, name=name, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return False
            try:
                for i, chunk in enumerate(r.iter_content(chunk_size=None, decode_unicode=False)):
                    if chunk and first is None:
                        first = time.perf_counter()
                    tail = (tail + chunk.decode("utf-8", "replace"))[-4096:]
                    if i >= MAX_CHUNKS:
                        r.failure("stream longer than the chunk bound")
                        return False
            except Exception as exc:  # noqa: BLE001 - a broken stream is a failure, not a crash
                r.failure(f"stream broke: {type(exc).__name__}: {exc}")
                return False
            if ERROR_MARK in tail:
                r.failure("error event in stream: " + tail[tail.index(ERROR_MARK):][:200])
                return False
            if first is None:
                r.failure("stream ended without text")
                return False
            r.success()
        self._record(name, start, first, MAX_NEW_TOKENS)
        return True


class StreamingUser(_KVBentoUser):
    """A chat client: streams from the request-id API and from the OpenAI chat API."""

    weight = 3

    @task
    def generate_stream(self) -> None:
        self._stream_text("/api/generate stream", {
            "request_id": f"lt-{uuid.uuid4().hex}", "prompt": random.choice(PROMPTS),
            "stream_response": True, "only_new_tokens": True, "generation_config": _generation_config()})

    @task
    def chat_stream(self) -> None:
        name = "/v1/chat/completions stream"
        body = {"model": "kvbento", "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": MAX_NEW_TOKENS,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        start = time.perf_counter()
        first = None
        tokens = None
        done = False
        with self.client.post("/v1/chat/completions", json=body, headers=_headers(), stream=True,
                              catch_response=True, name=name, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                for i, line in enumerate(r.iter_lines(decode_unicode=True)):
                    if i >= MAX_CHUNKS:
                        r.failure("stream longer than the line bound")
                        return
                    if not line or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        r.failure(f"error event in stream: {data[:200]}")
                        return
                    for choice in event.get("choices") or []:
                        if (choice.get("delta") or {}).get("content") and first is None:
                            first = time.perf_counter()
                    if event.get("usage"):
                        tokens = event["usage"].get("completion_tokens")
            except Exception as exc:  # noqa: BLE001 - a broken stream is a failure, not a crash
                r.failure(f"stream broke: {type(exc).__name__}: {exc}")
                return
            if not done:
                r.failure("stream ended without data: [DONE]")
                return
            if tokens is None:
                r.failure("no usage chunk (stream_options.include_usage)")
                return
            r.success()
        self._record(name, start, first, int(tokens))


class BatchUser(_KVBentoUser):
    """An offline job: several prompts in one /api/generate-batch call."""

    weight = 1

    @task
    def generate_batch(self) -> None:
        name = "/api/generate-batch"
        body = {"prompts": [{"request_id": f"lt-{uuid.uuid4().hex}", "prompt": random.choice(PROMPTS)}
                            for _ in range(BATCH_PROMPTS)],
                "only_new_tokens": True, "generation_config": _generation_config()}
        start = time.perf_counter()
        with self.client.post("/api/generate-batch", json=body, headers=_headers(), catch_response=True,
                              name=name, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                items = r.json()
            except ValueError:
                r.failure("answer is not JSON")
                return
            if not isinstance(items, list) or len(items) != BATCH_PROMPTS:
                r.failure(f"expected {BATCH_PROMPTS} items, got {str(items)[:200]}")
                return
            r.success()
        self._record(name, start, None, MAX_NEW_TOKENS * BATCH_PROMPTS, streamed=False)


class MultiTurnUser(_KVBentoUser):
    """A conversation: each turn continues the same request_id from its stored KV state."""

    weight = 2

    def on_start(self) -> None:
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.request_id = f"lt-mt-{uuid.uuid4().hex}"
        self.turn = 0

    @task
    def next_turn(self) -> None:
        ok = self._stream_text("/api/generate multi-turn", {
            "request_id": self.request_id, "prompt": random.choice(PROMPTS), "stream_response": True,
            "only_new_tokens": True, "generation_config": _generation_config()})
        self.turn += 1
        if not ok or self.turn >= TURNS:
            # Bounded conversations: drop the record so the store does not grow without end.
            with self.client.delete(f"/api/cache/{self.request_id}", headers=_headers(), catch_response=True,
                                    name="/api/cache/[id] delete", timeout=TIMEOUT) as r:
                if r.status_code in (204, 404):  # 404: a failed first turn stored nothing
                    r.success()
                else:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            self._new_conversation()

"""Streaming HTTP clients for the three contenders and the load generator (fixed concurrency or
Poisson arrivals). Metrics follow ``vllm bench serve``: TTFT, ITL, TPOT, E2E, throughput."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Result:
    """One request as the client saw it."""

    ttft: float = 0.0
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    ok: bool = True
    error: str = ""

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.num_tokens - 1) if self.num_tokens > 1 else None


class Contender:
    """Base: ``await send(session, prompt, max_new_tokens, request_id)`` -> Result."""

    name = "?"

    def __init__(self, url: str) -> None:
        self.url = url

    async def send(self, session: aiohttp.ClientSession, prompt: str, n: int, request_id: str) -> Result:
        raise NotImplementedError

    async def _stream(self, session, path: str, body: dict, parse) -> Result:
        r = Result()
        start = time.perf_counter()
        try:
            async with session.post(self.url + path, json=body) as resp:
                if resp.status != 200:
                    r.ok, r.error = False, f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return r
                async for chunk in parse(resp, r):
                    now = time.perf_counter() - start
                    if not r.chunk_times:
                        r.ttft = now
                    r.chunk_times.append(now)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            r.ok, r.error = False, f"{type(exc).__name__}: {exc}"
        r.e2e = time.perf_counter() - start
        return r


async def _raw_chunks(resp, r: Result):
    async for data in resp.content.iter_any():
        if data:
            yield data


class Kvbento(Contender):
    """kvbento's request-id API, streamed text (min_new_tokens forces exactly n tokens)."""

    name = "kvbento"

    async def send(self, session, prompt, n, request_id):
        body = {"request_id": request_id, "prompt": prompt, "stream_response": True,
                "generation_config": {"max_new_tokens": n, "min_new_tokens": n}}
        r = await self._stream(session, "/api/generate", body, _raw_chunks)
        r.num_tokens = n if r.ok else 0
        return r


class Naive(Contender):
    name = "naive"

    async def send(self, session, prompt, n, request_id):
        r = await self._stream(session, "/generate", {"prompt": prompt, "max_new_tokens": n}, _raw_chunks)
        r.num_tokens = n if r.ok else 0
        return r


class HFServe(Contender):
    """`transformers serve` /v1/completions: it rejects min_tokens, so tokens are counted from usage
    (or from the streamed chunks, one token each, when no usage arrives)."""

    name = "hf-serve"

    def __init__(self, url: str, model: str) -> None:
        super().__init__(url)
        self.model = model

    def body(self, prompt: str, n: int) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}

    async def send(self, session, prompt, n, request_id):
        body = self.body(prompt, n)
        counted = {"chunks": 0, "usage": None}

        async def parse(resp, r):
            async for msg in sse_messages(resp):
                if msg.get("usage"):
                    counted["usage"] = msg["usage"].get("completion_tokens")
                if any(c.get("text") for c in msg.get("choices") or []):
                    counted["chunks"] += 1
                    yield msg

        r = await self._stream(session, "/v1/completions", body, parse)
        r.num_tokens = counted["usage"] or counted["chunks"]
        return r


class Chat(Contender):
    """Any OpenAI server's /v1/chat/completions, streamed: the API the peer targets are stated in.
    ``ignore_eos`` holds kvbento and vLLM to exactly ``n`` tokens; `transformers serve` does not
    take it, so its tokens are counted from usage (or one per content chunk)."""

    def __init__(self, url: str, model: str, name: str, ignore_eos: bool = True) -> None:
        super().__init__(url)
        self.model, self.name, self.ignore_eos = model, name, ignore_eos

    async def send(self, session, prompt, n, request_id):
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        counted = {"chunks": 0, "usage": None}

        async def parse(resp, r):
            async for msg in sse_messages(resp):
                if msg.get("usage"):
                    counted["usage"] = msg["usage"].get("completion_tokens")
                if any((c.get("delta") or {}).get("content") for c in msg.get("choices") or []):
                    counted["chunks"] += 1
                    yield msg

        r = await self._stream(session, "/v1/chat/completions", body, parse)
        r.num_tokens = counted["usage"] or counted["chunks"]
        return r


async def sse_messages(resp) -> AsyncIterator[dict]:
    """The JSON payloads of a Server-Sent Events answer as they arrive (``[DONE]`` skipped)."""
    buf = b""
    async for data in resp.content.iter_any():
        buf += data
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            for line in frame.split(b"\n"):
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                    yield json.loads(line[5:])


async def run_load(c: Contender, prompts: list[str], n: int, *, concurrency: int | None = None,
                   rate: float | None = None, seed: int = 0, tag: str = "") -> tuple[list[Result], float]:
    """Send every prompt once (fresh request_ids) at fixed ``concurrency`` or Poisson ``rate`` (req/s).

    Returns the results and the wall time of the whole run.
    """
    timeout = aiohttp.ClientTimeout(total=1800)
    results: list[Result] = []
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        if rate is None:
            sem = asyncio.Semaphore(concurrency or 1)

            async def one(i: int, p: str) -> None:
                async with sem:
                    results.append(await c.send(session, p, n, f"bench-{tag}-{i}-{rng.random():.12f}"))

            await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        else:
            tasks = []
            for i, p in enumerate(prompts):
                tasks.append(asyncio.create_task(c.send(session, p, n, f"bench-{tag}-p{i}-{rng.random():.12f}")))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
    return results, wall


def _stats(xs: list[float]) -> tuple[float, float, float]:
    if not xs:
        return (float("nan"),) * 3
    s = sorted(xs)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return statistics.fmean(s), statistics.median(s), p99


def summarize(results: list[Result], wall: float) -> dict:
    """The vllm-bench-serve figures in milliseconds (mean, median, p99) and throughputs."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.num_tokens for r in ok)
    ms = lambda xs: tuple(1000 * x for x in _stats(xs))  # noqa: E731
    return {
        "num_ok": len(ok), "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "ttft": ms([r.ttft for r in ok]),
        "itl": ms([x for r in ok for x in r.itls]),
        "tpot": ms([t for r in ok if (t := r.tpot) is not None]),
        "e2e": ms([r.e2e for r in ok]),
        "req_per_s": len(ok) / wall if wall else 0.0,
        "out_tok_per_s": out_tokens / wall if wall else 0.0,
        "mean_out_tokens": out_tokens / len(ok) if ok else 0.0,
    }

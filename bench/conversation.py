"""Chat conversations over HTTP: N concurrent conversations x T turns on /v1/chat/completions, the
whole history resent each turn (as OpenAI clients do), a system prompt shared per group; per turn
TTFT, cached tokens and the bytes the store wrote. Also: how many bytes conversations sharing one
long system prompt leave in the store."""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time

import aiohttp

from bench.client import sse_messages


def _words(tok, num_tokens: int, seed: int) -> str:
    """Plain text of about ``num_tokens`` tokens (ordinary tokens only)."""
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special]
    text = tok.decode([rng.choice(pool) for _ in range(num_tokens * 2)], skip_special_tokens=True)
    ids = tok(text, add_special_tokens=False).input_ids[:num_tokens]
    return tok.decode(ids, skip_special_tokens=True)


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    """A counter summed over its series from /metrics (0 when absent)."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(r"^" + re.escape(name) + r"(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
            if m:
                total += float(m.group(2))
    return total


async def chat(session: aiohttp.ClientSession, url: str, model: str, messages: list[dict], n_out: int,
               request_id: str | None, exact: bool) -> dict:
    """One streamed chat turn: TTFT (first content), the answer, usage."""
    body = {"model": model, "messages": messages, "max_tokens": n_out, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if exact:  # vLLM's extensions, which kvbento honours: exactly n_out tokens
        body.update(ignore_eos=True, min_tokens=n_out)
    if request_id:
        body["request_id"] = request_id
    out = {"ok": False, "ttft": None, "text": "", "usage": None, "error": None}
    start = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                out["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for msg in sse_messages(resp):
                if msg.get("usage"):
                    out["usage"] = msg["usage"]
                for c in msg.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        if out["ttft"] is None:
                            out["ttft"] = time.perf_counter() - start
                        out["text"] += piece
        out["ok"] = out["ttft"] is not None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


async def conversations(url: str, model: str, tok, *, num_conv: int = 4, turns: int = 4, turn_tokens: int = 384,
                        system_tokens: int = 256, group: int = 2, n_out: int = 32, with_request_id: bool,
                        exact: bool = True, seed: int = 0, measure_bytes: bool = True) -> list[dict]:
    """Per turn: median TTFT (ms), mean prompt/cached tokens, mean bytes written per conversation."""
    systems = [_words(tok, system_tokens, seed + 1000 + g) for g in range(-(-num_conv // group))]
    histories = [[{"role": "system", "content": systems[i // group]}] for i in range(num_conv)]
    tag = f"{seed}-{time.time_ns()}"
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        prev_total = [0] * num_conv
        for t in range(turns):
            for i, h in enumerate(histories):
                h.append({"role": "user", "content": _words(tok, turn_tokens, seed + 100 * t + i)})
            before = await metric(session, url, "kvbento_kv_store_write_bytes_total") if measure_bytes else 0.0
            results = await asyncio.gather(*(
                chat(session, url, model, h, n_out, f"conv-{tag}-{i}" if with_request_id else None, exact)
                for i, h in enumerate(histories)))
            after = await metric(session, url, "kvbento_kv_store_write_bytes_total") if measure_bytes else 0.0
            head_bytes = None
            if with_request_id:
                async with session.get(f"{url}/api/cache/conv-{tag}-0") as resp:
                    if resp.status == 200:
                        head_bytes = (await resp.json()).get("head_bytes")
            ok = [r for r in results if r["ok"]]
            usage = [r["usage"] or {} for r in ok]
            cached = [(u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usage]
            prompt = [u.get("prompt_tokens", 0) for u in usage]
            completion = [u.get("completion_tokens", 0) for u in usage]
            new = [p + c - pt for p, c, pt in zip(prompt, completion, prev_total)]
            rows.append({
                "turn": t + 1, "ok": len(ok), "failed": len(results) - len(ok),
                "errors": [r["error"] for r in results if not r["ok"]][:1],
                "ttft_ms": 1000 * statistics.median([r["ttft"] for r in ok]) if ok else float("nan"),
                "prompt_tokens": statistics.mean(prompt) if prompt else 0,
                "cached_tokens": statistics.mean(cached) if cached else 0,
                "min_cached_minus_prev": min((c - pt for c, pt in zip(cached, prev_total)), default=0),
                "new_tokens": statistics.mean(new) if new else 0,
                "bytes_written": (after - before) / max(len(ok), 1),
                "head_bytes": head_bytes,
            })
            prev_total = [p + c for p, c in zip(prompt, completion)] if len(ok) == num_conv else prev_total
            for h, r in zip(histories, results):
                h.append({"role": "assistant", "content": r["text"]})
    return rows


async def shared_system_prompt(url: str, model: str, tok, *, num_conv: int = 8, system_tokens: int = 1024,
                               suffix_tokens: int = 128, n_out: int = 16, seed: int = 77) -> dict:
    """Bytes the store wrote for ``num_conv`` one-turn conversations sharing one system prompt."""
    system = _words(tok, system_tokens, seed)
    tag = time.time_ns()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        before = await metric(session, url, "kvbento_kv_store_write_bytes_total")
        usage = []
        for i in range(num_conv):  # one after another: each finds the blocks the first one wrote
            r = await chat(session, url, model, [{"role": "system", "content": system},
                                                 {"role": "user", "content": _words(tok, suffix_tokens, seed + i + 1)}],
                           n_out, f"share-{tag}-{i}", True)
            usage.append(r["usage"] or {})
        after = await metric(session, url, "kvbento_kv_store_write_bytes_total")
    rendered = tok.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    sys_ids = len(tok(rendered, add_special_tokens=False).input_ids)
    totals = [u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) - 1 for u in usage]
    return {"num_conv": num_conv, "system_tokens": sys_ids, "bytes_written": after - before,
            "positions_unique": sys_ids + sum(t - sys_ids for t in totals)}

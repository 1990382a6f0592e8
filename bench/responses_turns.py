"""A Responses-API conversation, turn by turn: ``previous_response_id`` (the server keeps the
conversation and its KV) against the same conversation sent with ``store: false`` and the whole
history resent in ``input`` (what a stateless client does). Per turn: TTFT (streaming, to the first
``response.output_text.delta``), input and cached tokens.

    python -m bench.responses_turns http://127.0.0.1:3000 --turns 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid

import aiohttp

from bench.client import sse_messages

# Plain English words: text of a predictable size whatever the tokenizer.
_WORDS = ["the", "cat", "sat", "on", "a", "warm", "mat", "while", "rain", "fell", "over", "quiet", "hills",
          "and", "rivers", "ran", "past", "old", "stone", "bridges", "where", "people", "walked", "slowly",
          "home", "after", "long", "days", "of", "work", "in", "busy", "towns"]


def _text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


async def _turn(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> dict:
    """One streamed response: TTFT to the first text delta, the final Response object."""
    out = {"ok": False, "ttft": None, "response": None, "error": None}
    start = time.perf_counter()
    try:
        async with session.post(url + "/v1/responses", json={**body, "stream": True}, headers=headers) as resp:
            if resp.status != 200:
                out["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            async for event in sse_messages(resp):
                kind = event.get("type")
                if kind == "response.output_text.delta" and out["ttft"] is None:
                    out["ttft"] = time.perf_counter() - start
                elif kind in ("response.completed", "response.incomplete"):
                    out["response"] = event["response"]
                elif kind in ("error", "response.failed"):
                    out["error"] = event.get("message") or json.dumps(event)[:200]
        out["ok"] = out["ttft"] is not None and out["response"] is not None
    except (TimeoutError, aiohttp.ClientError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


async def _run(base_url: str, turns: int, *, turn_words: int, n_out: int, instructions: str,
               api_key: str | None, seed: int, model: str) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tag = uuid.uuid4().hex[:8]
    # Each variant starts with its own instructions, so neither finds the other's KV blocks.
    chained_instr = f"[A-{tag}] {instructions}"
    resent_instr = f"[B-{tag}] {instructions}"
    common = {"model": model, "max_output_tokens": n_out, "temperature": 0,
              "ignore_eos": True, "min_tokens": n_out}  # exactly n_out tokens a turn
    previous = None
    history: list[dict] = []
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        # One throwaway request first, so neither variant's first turn pays for a cold server.
        await _turn(session, base_url, {**common, "input": _text(8, seed - 1), "store": False}, headers)
        for t in range(turns):
            user = _text(turn_words, seed + t)
            chained = await _turn(session, base_url, {**common, "input": user, "instructions": chained_instr,
                                                      "previous_response_id": previous}, headers)
            history.append({"role": "user", "content": user})
            resent = await _turn(session, base_url, {**common, "input": history, "instructions": resent_instr,
                                                     "store": False}, headers)
            if resent["ok"]:
                text = resent["response"]["output"][0]["content"][0]["text"]
                history.append({"role": "assistant", "content": [{"type": "output_text", "text": text}]})
            if chained["ok"]:
                previous = chained["response"]["id"]
            row = {"turn": t + 1}
            for name, r in (("chained", chained), ("resent", resent)):
                u = (r["response"] or {}).get("usage") or {}
                row[f"{name}_ok"] = r["ok"]
                row[f"{name}_ttft_ms"] = 1000 * r["ttft"] if r["ttft"] is not None else float("nan")
                row[f"{name}_input_tokens"] = u.get("input_tokens", 0)
                row[f"{name}_cached_tokens"] = (u.get("input_tokens_details") or {}).get("cached_tokens", 0)
                row[f"{name}_error"] = r["error"]
            rows.append(row)
            if not (chained["ok"] and resent["ok"]):
                break  # a broken chain makes the later turns meaningless
    return rows


def run_responses_turns(base_url: str, turns: int, *, turn_words: int = 120, n_out: int = 32,
                        instructions: str = "You are a helpful assistant.", api_key: str | None = None,
                        seed: int = 0, model: str = "kvbento") -> list[dict]:
    """Per-turn TTFT of one Responses conversation chained by ``previous_response_id`` vs the same
    conversation resent whole with ``store: false``, turn by turn in the same run.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:3000``.
        turns: user turns; each adds ``turn_words`` words of input and ``n_out`` answer tokens
            (exactly: ``ignore_eos`` + ``min_tokens``), greedy.
    Returns:
        One dict per turn: ``turn`` and, for ``chained`` and ``resent``, ``*_ttft_ms``,
        ``*_input_tokens``, ``*_cached_tokens``, ``*_ok``, ``*_error``. Stops after a failed turn.
    """
    return asyncio.run(_run(base_url, turns, turn_words=turn_words, n_out=n_out, instructions=instructions,
                            api_key=api_key, seed=seed, model=model))


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| turn | input tokens | previous_response_id TTFT ms (cached) | store:false resent TTFT ms (cached) |",
             "|---:|---:|---:|---:|"]
    def cell(r: dict, name: str) -> str:
        if not r[f"{name}_ok"]:
            return f"failed: {r[f'{name}_error']}"
        return f"{r[f'{name}_ttft_ms']:.1f} ({r[f'{name}_cached_tokens']})"

    for r in rows:
        lines.append(f"| {r['turn']} | {r['chained_input_tokens']} | {cell(r, 'chained')} | {cell(r, 'resent')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_url")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--turn-words", type=int, default=120)
    ap.add_argument("--n-out", type=int, default=32)
    ap.add_argument("--api-key")
    args = ap.parse_args(argv)
    rows = run_responses_turns(args.base_url, args.turns, turn_words=args.turn_words, n_out=args.n_out,
                               api_key=args.api_key)
    print(table(rows))
    return 0 if rows and all(r["chained_ok"] and r["resent_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

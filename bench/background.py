"""Background responses: takeover time and recomputation when the running replica is SIGKILLed,
and the cost of ``background: true`` on output tokens/s against the same requests streamed.

Starts its own redis-server and two replicas (launcher/), the bundled tiny model unless
``--model``; prints a markdown table (BENCHMARKS.md, issue 23).

    python -m bench.background --lease 2 --concurrency 16 --tokens 256
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from launcher import ServeProcess
from launcher.redis import RedisServer


def _ask(text: str, n: int, **extra) -> dict:
    return dict(model="kvbento", input=text, max_output_tokens=n, temperature=0, extra_body={"ignore_eos": True},
                **extra)


def takeover(a: ServeProcess, b: ServeProcess, lease: float, tokens: int) -> dict:
    """Kill ``a`` while it runs a response that a client follows on ``b``: seconds from the kill to
    the next new event on ``b``, and what the survivor restored and recomputed (from its log)."""
    ca, cb = (OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=300) for s in (a, b))
    r = ca.responses.create(background=True, **_ask("Tell me a long story " + str(time.time()), tokens))
    killed_at: list[float] = []
    gap = {}

    def follow() -> None:
        last = time.perf_counter()
        for e in cb.responses.retrieve(r.id, stream=True):
            now = time.perf_counter()
            if killed_at and "after_kill" not in gap and e.type == "response.output_text.delta":
                gap["after_kill"] = now - killed_at[0]
            gap.setdefault("max_gap", 0.0)
            gap["max_gap"] = max(gap["max_gap"], now - last)
            last = now

    t = threading.Thread(target=follow)
    t.start()
    while True:  # let it run a while, then kill the runner
        got = ca.responses.retrieve(r.id)
        if got.output and len(got.output[0].content[0].text) > 400:
            break
        time.sleep(0.05)
    killed_at.append(time.perf_counter())
    a.kill()
    t.join()
    found = re.search(r"resumed background response \S+: (\d+) tokens known, (\d+) restored from the store, "
                      r"(\d+) recomputed", b.log(200_000))
    known, restored, recomputed = (int(x) for x in found.groups()) if found else (0, 0, -1)
    return {"seconds": gap.get("after_kill"), "known": known, "restored": restored, "recomputed": recomputed}


def throughput(url: str, n: int, tokens: int, background: bool) -> float:
    """Output tokens/s of ``n`` concurrent responses, streamed or in the background (polled)."""
    c = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    tag = str(time.time())

    def one(i: int) -> int:
        body = _ask(f"Story {i} {tag}", tokens)
        if not background:
            out = 0
            for e in c.responses.create(stream=True, **body):
                if e.type in ("response.completed", "response.incomplete"):
                    out = e.response.usage.output_tokens
            return out
        r = c.responses.create(background=True, **body)
        while r.status in ("queued", "in_progress"):
            time.sleep(0.05)
            r = c.responses.retrieve(r.id)
        return r.usage.output_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        total = sum(pool.map(one, range(n)))
    return total / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    redis = RedisServer().start()
    env = {"KVBENTO_CACHE_URL": redis.url, "KVBENTO_LEASE_SECONDS": str(args.lease), "KVBENTO_API_KEYS": ""}
    if args.model:
        env["KVBENTO_MODEL"] = args.model
    servers = [ServeProcess({**env, "BENTOML_HOME": tempfile.mkdtemp()}).start() for _ in range(2)]
    try:
        rates = {True: [], False: []}
        for _ in range(args.rounds):  # alternated, so drift on a shared machine hits both alike
            for bg in (False, True):
                rates[bg].append(throughput(servers[1].url, args.concurrency, args.tokens, bg))
        tk = takeover(servers[0], servers[1], args.lease, 2000)
    finally:
        for s in servers:
            s.stop()
        redis.kill()
    streamed, background = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"| figure | value | target |\n|---|---|---|")
    print(f"| takeover: SIGKILL of the runner -> next token on the survivor | {tk['seconds']:.2f} s "
          f"(lease {args.lease:g} s) | <= 2 x lease + one restore = {2 * args.lease:g} s + restore |")
    print(f"| tokens recomputed by the takeover | {tk['recomputed']} of {tk['known']} "
          f"({tk['restored']} restored) | 0 beyond the unfinished last block |")
    print(f"| out tok/s, {args.concurrency} concurrent x {args.tokens} tokens, streamed | {streamed:.0f} "
          f"(rounds: {', '.join(f'{r:.0f}' for r in rates[False])}) | |")
    print(f"| out tok/s, same, background: true (polled) | {background:.0f} "
          f"(rounds: {', '.join(f'{r:.0f}' for r in rates[True])}) | |")
    print(f"| overhead of background | {100 * (1 - background / streamed):.1f} % | <= 5 % |")


if __name__ == "__main__":
    main()

"""Background responses: takeover time and recomputation when the running replica is SIGKILLed,
and the cost of ``background: true`` on output tokens/s against the same requests streamed.

Starts its own redis-server and two replicas (launcher/), the bundled tiny model unless
``--model``; prints a markdown table (BENCHMARKS.md, issue 23).

    python -m bench.background --lease 2 --concurrency 16 --tokens 256
    python -m bench.background --store-only --concurrency 16   # the store's cost per poll tick alone
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from launcher import ServeProcess
from launcher.redis import RedisServer


def _ask(text: str, n: int, **extra) -> dict:
    return dict(model="kvbento", input=text, max_output_tokens=n, temperature=0, extra_body={"ignore_eos": True},
                **extra)


def takeover(a: ServeProcess, b: ServeProcess, tokens: int) -> dict:
    """Kill ``a`` while it runs a response that a client follows on ``b``: seconds from the kill to
    the first event the survivor wrote (sequence number past those stored at the death), and what
    the survivor restored and recomputed (from its log)."""
    ca, cb = (OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=300) for s in (a, b))
    r = ca.responses.create(background=True, **_ask("Tell me a long story " + str(time.time()), tokens))
    arrived: dict[int, float] = {}

    def follow() -> None:
        for e in cb.responses.retrieve(r.id, stream=True):
            arrived[e.sequence_number] = time.perf_counter()

    t = threading.Thread(target=follow)
    t.start()
    while True:  # let it run a while, then kill the runner
        got = ca.responses.retrieve(r.id)
        if got.output and len(got.output[0].content[0].text) > 1500:
            break
        time.sleep(0.05)
    killed_at = time.perf_counter()
    a.kill()
    t.join()
    log = b.log(300_000)
    taken = re.search(r"taking over background job \S+ after (\d+) events", log)
    found = re.search(r"resumed background response \S+: (\d+) tokens known, (\d+) restored from the store, "
                      r"(\d+) recomputed \(restore ([\d.]+) s\)", log)
    known, restored, recomputed = (int(x) for x in found.groups()[:3]) if found else (0, 0, -1)
    first_new = min((at for seq, at in arrived.items() if taken and seq >= int(taken.group(1))), default=None)
    return {"seconds": first_new - killed_at if first_new else float("nan"), "known": known,
            "restored": restored, "recomputed": recomputed, "restore": float(found.group(4)) if found else 0.0}


def throughput(url: str, n: int, tokens: int, background: bool) -> float:
    """Output tokens/s of ``n`` concurrent streamed responses: straight from the engine, or run in
    the background and streamed from the store's event list."""
    c = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    tag = str(time.time())

    def one(i: int) -> int:
        out = 0
        for e in c.responses.create(stream=True, background=background, **_ask(f"Story {i} {tag}", tokens)):
            if e.type in ("response.completed", "response.incomplete"):
                out = e.response.usage.output_tokens
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        total = sum(pool.map(one, range(n)))
    return total / (time.perf_counter() - start)


def store_ticks(url: str, jobs: int, ticks: int, events: int = 3) -> dict[str, float]:
    """The store's share alone: CPU ms and wall ms per poll tick that writes ``events`` pending
    events of each of ``jobs`` jobs, one fenced append per job (gathered, as the per-job writers
    did) or one ``append_many`` for them all. CPU time is this process's, all threads: less
    sensitive to the machine's other load than tok/s."""
    import asyncio

    from cache.factory import open_backend
    from cache.jobs import JobStore
    from cache.store import KVStore

    store = KVStore(open_backend(url), "bench", timeout=5)
    js = JobStore(store, ttl=60, lease_seconds=5)
    event = {"type": "response.output_text.delta", "sequence_number": 0, "item_id": "msg_" + "0" * 32,
             "output_index": 0, "content_index": 0, "delta": " word", "logprobs": []}
    items = [{"e": event, "ids": [1234]} for _ in range(events)]

    async def run(batched: bool) -> tuple[float, float]:
        ids = [f"resp_{uuid.uuid4().hex}" for _ in range(jobs)]
        cpu, wall = time.process_time(), time.perf_counter()
        for t in range(ticks):
            if batched:
                await js.append_many([("bench", j, t * events, items) for j in ids])
            else:
                await asyncio.gather(*(js.append_events("bench", j, t * events, items) for j in ids))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        for j in ids:
            await js.delete("bench", j)
        return 1000 * cpu / ticks, 1000 * wall / ticks

    try:
        out = {}
        for _ in range(3):  # alternated; the best of three each
            for batched in (False, True):
                cpu, wall = asyncio.run(run(batched))
                key = "batched" if batched else "per_job"
                best = out.get(key, (float("inf"), float("inf")))
                out[key] = (min(best[0], cpu), min(best[1], wall))
        return out
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--poll", type=float, default=0.05, help="KVBENTO_BACKGROUND_POLL_SECONDS")
    ap.add_argument("--model", default=None)
    ap.add_argument("--store-only", action="store_true",
                    help="only the store's cost per poll tick: per-job appends vs one batched call")
    args = ap.parse_args()
    redis = RedisServer().start()
    if args.store_only:
        try:
            got = store_ticks(redis.url, args.concurrency, 200)
        finally:
            redis.kill()
        print(f"| store cost per poll tick, {args.concurrency} jobs x 3 events | CPU ms | wall ms |\n|---|---|---|")
        for name, (cpu, wall) in got.items():
            print(f"| {name.replace('_', ' ')} | {cpu:.2f} | {wall:.2f} |")
        return
    env = {"KVBENTO_CACHE_URL": redis.url, "KVBENTO_LEASE_SECONDS": str(args.lease), "KVBENTO_API_KEYS": "",
           "KVBENTO_BACKGROUND_POLL_SECONDS": str(args.poll)}
    if args.model:
        env["KVBENTO_MODEL"] = args.model
    servers = [ServeProcess({**env, "BENTOML_HOME": tempfile.mkdtemp()}).start() for _ in range(2)]
    try:
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):  # alternated, so drift on a shared machine hits both alike
            for bg in (False, True):
                rates[bg].append(throughput(servers[1].url, args.concurrency, args.tokens, bg))
        tk = takeover(servers[0], servers[1], 1500)
    except Exception:
        for s in servers:
            print("\n".join(line for line in s.log(300_000).splitlines() if "WARN" in line or "rror" in line)[-3000:])
        raise
    finally:
        for s in servers:
            s.stop()
        redis.kill()
    streamed, background = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"| figure | value | target |\n|---|---|---|")
    print(f"| takeover: SIGKILL of the runner -> next token on the survivor | {tk['seconds']:.2f} s "
          f"(lease {args.lease:g} s) | <= 2 x lease + one restore = {2 * args.lease + tk['restore']:.2f} s "
          f"(restore: {tk['restore']:.3f} s) |")
    print(f"| tokens recomputed by the takeover | {tk['recomputed']} of {tk['known']} "
          f"({tk['restored']} restored) | 0 beyond the unfinished last block |")
    print(f"| out tok/s, {args.concurrency} concurrent x {args.tokens} tokens, streamed | {streamed:.0f} "
          f"(rounds: {', '.join(f'{r:.0f}' for r in rates[False])}) | |")
    print(f"| out tok/s, same, background: true (streamed from the store) | {background:.0f} "
          f"(rounds: {', '.join(f'{r:.0f}' for r in rates[True])}) | |")
    print(f"| overhead of background (events written every {args.poll:g} s) | "
          f"{100 * (1 - background / streamed):.1f} % | <= 5 % |")


if __name__ == "__main__":
    main()

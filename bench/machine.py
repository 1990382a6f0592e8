"""The engine against the machine's own limits, in process, per dtype (issue 25).

Measured in one run, per dtype: the GEMM rate of the model's own linear layers (the kernels the
engine runs: oneDNN-packed where oneDNN packs the dtype, else torch's) at m = 16, 256 and 1024 rows,
and the copy bandwidth; then the engine's prefill of a 1k-token prompt (tokens/s × 2 × the
parameters every token passes through) as a share of the GEMM rate, and its batch-1 decode
(tokens/s × weight bytes) as a share of the copy bandwidth; and the store codec's bytes and
encode/decode times for a 1k-token record.

Run: ``python -m bench.machine [--dtype float32 --dtype bfloat16] [--out BENCHMARKS.md]``. It
replaces the section it owns in BENCHMARKS.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch

from bench import micro
from cache.codec import decode, encode

ROOT = Path(__file__).resolve().parent.parent
HEADER = "## Against the machine: GEMM rate, copy bandwidth, codec, per dtype (issue 25)"
ROWS = (16, 256, 1024)


def _best_seconds(fn, min_seconds: float = 0.3, reps: int = 3) -> float:
    """Best-of-``reps`` mean time of ``fn()``, each rep at least ``min_seconds`` long."""
    fn()
    best = float("inf")
    for _ in range(reps):
        n, t = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t
            if el >= min_seconds:
                break
        best = min(best, el / n)
    return best


@torch.inference_mode()
def gemm_rates(model: torch.nn.Module, rows=ROWS) -> dict[int, float]:
    """GFLOP/s of one pass over every linear of the decoder layers (each distinct shape timed once,
    weighted by how often it occurs), at each row count ``m``, with the model's own modules."""
    shapes: dict[tuple[int, int], list] = {}
    for name, mod in model.named_modules():
        if ".layers." in name and hasattr(mod, "in_features") and hasattr(mod, "out_features") \
                and not list(mod.children()):
            shapes.setdefault((mod.in_features, mod.out_features), []).append(mod)
    dtype = next(model.parameters()).dtype
    out = {}
    for m in rows:
        flops = seconds = 0.0
        for (k, n), mods in shapes.items():
            x = torch.randn(m, k).to(dtype)
            t = _best_seconds(lambda: mods[0](x), 0.2)
            flops += 2 * m * k * n * len(mods)
            seconds += t * len(mods)
        out[m] = flops / seconds / 1e9
    return out


def layer_linear_params(model: torch.nn.Module) -> int:
    """Weights of the decoder layers' linears: every prompt token multiplies through all of them (the
    LM head runs for the last position only; embeddings are a lookup)."""
    cfg = model.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or h // heads
    return layers * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i)


def engine_timings(loaded, prompt_tokens: int, decode_tokens: int, reps: int) -> dict:
    """Median TTFT of a ``prompt_tokens`` prompt (prefill + one decode step) and mean batch-1 ITL."""
    from model.engine import Engine, EngineConfig
    from model.types import SamplingParams
    from session import Session
    from session.request import GenerateRequest

    engine = Engine(loaded, EngineConfig(max_batch_size=8, prefill_chunk=512))
    session = Session(engine, None)
    g = torch.Generator().manual_seed(1)

    async def one(rid: str, ids: list[int], n: int) -> list[float]:
        req = GenerateRequest(rid, prompt_ids=ids, params=SamplingParams(max_new_tokens=n, min_new_tokens=n),
                              use_cache=False)
        t0 = time.perf_counter()
        stamps = [t0]
        async for d in await session.generate(req):
            if d.token_ids:
                stamps.append(time.perf_counter())
        return stamps

    vocab = loaded.model.config.vocab_size
    ttft, itl = [], []
    try:
        for r in range(reps):
            ids = torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist()
            stamps = asyncio.run(one(f"pf{r}", ids, 1))
            ttft.append(stamps[1] - stamps[0])
            stamps = asyncio.run(one(f"dc{r}", ids[:16], decode_tokens))
            itl += [b - a for a, b in zip(stamps[2:], stamps[3:])]
    finally:
        engine.close()
    return {"ttft_s": statistics.median(ttft), "itl_s": statistics.fmean(itl)}


def codec(cfg, dtype: torch.dtype, tokens: int = 1024, reps: int = 5) -> dict:
    """Encoded bytes and median encode / decode ms of a ``tokens``-token record in ``dtype``."""
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rec = micro.make_record(cfg.num_hidden_layers, heads, head_dim, tokens + 1, dtype)
    enc, dec = [], []
    for _ in range(reps):
        t = time.perf_counter()
        data = encode(rec)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode(data)
        dec.append(time.perf_counter() - t)
    return {"bytes": len(data), "encode_ms": 1e3 * statistics.median(enc), "decode_ms": 1e3 * statistics.median(dec)}


def measure(model_dir: str, dtype: str, prompt_tokens: int, decode_tokens: int, reps: int) -> dict:
    from model import loader

    m = loader.load(model_dir, "cpu", dtype)
    res = {"dtype": str(m.dtype).removeprefix("torch."), "reason": m.dtype_reason, "kernels": m.kernels,
           "weight_bytes": m.weight_bytes, "params": layer_linear_params(m.model)}
    t = time.perf_counter()
    from model import kernels

    kernels.batch_variance(m.model)  # what the load-time probe costs
    res["probe_s"] = time.perf_counter() - t
    cfg = m.model.config
    plain = torch.nn.Linear(cfg.hidden_size, cfg.intermediate_size).to(m.dtype)
    res["plain_variance"] = kernels.batch_variance(plain)  # torch's own linear (KVBENTO_CPU_KERNELS=torch)
    print(f"[{res['dtype']}] GEMM ...", flush=True)
    res["gemm_gflops"] = gemm_rates(m.model)
    res["copy_gbs"] = micro.memory_bandwidth_gbs(256)
    print(f"[{res['dtype']}] engine ...", flush=True)
    res.update(engine_timings(m, prompt_tokens, decode_tokens, reps))
    res["copy_gbs"] = max(res["copy_gbs"], micro.memory_bandwidth_gbs(256))  # before and after, best
    res["codec"] = codec(m.model.config, m.dtype)
    res["prompt_tokens"] = prompt_tokens
    return res


def render(results: list[dict], meta: dict) -> str:
    lines = [HEADER, "", f"`python -m bench.machine` ({meta['when']}, {meta['cpu']}, {meta['threads']} torch "
             f"thread(s), bench model, in process). {meta['note']} `KVBENTO_DTYPE=auto` here: {meta['auto']}.", "",
             "| dtype (why) | kernels | GEMM GFLOP/s m=16 / 256 / 1024 | copy GB/s | prefill "
             f"{results[0]['prompt_tokens']} tok: ms, tok/s | prefill × 2 × params / GEMM(1024) | batch-1 "
             "decode tok/s | decode × weight bytes / copy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        g = r["gemm_gflops"]
        pf_tok_s = r["prompt_tokens"] / r["ttft_s"]
        pf_share = pf_tok_s * 2 * r["params"] / 1e9 / g[1024]
        dec = 1 / r["itl_s"]
        dec_share = dec * r["weight_bytes"] / 1e9 / r["copy_gbs"]
        k = r["kernels"]
        lines.append(f"| {r['dtype']} ({r['reason']}) | linears={k['linears']} attention={k['attention']} "
                     f"step={k['decode_step']} batch-invariant={k.get('batch_invariant')} | {g[16]:.1f} / {g[256]:.1f} / {g[1024]:.1f} | {r['copy_gbs']:.1f} "
                     f"| {1e3 * r['ttft_s']:,.0f}, {pf_tok_s:,.0f} | {100 * pf_share:.0f} % | {dec:.1f} "
                     f"| {100 * dec_share:.0f} % |")
    lines += ["", "Store codec, one 1k-token record of the bench model's KV:", "",
              "| dtype | bytes | encode ms | decode ms |", "|---|---|---|---|"]
    for r in results:
        c = r["codec"]
        lines.append(f"| {r['dtype']} | {c['bytes']:,} | {c['encode_ms']:.2f} | {c['decode_ms']:.2f} |")
    lines += ["", "Batch invariance (a row's result alone == in a batch, every linear shape at 2/5/16/33 rows, "
              "fused SiLU/add included): " + "; ".join(
                  f"{r['dtype']}: the engine's linears {'invariant' if r['kernels'].get('batch_invariant') == 'yes' else 'NOT invariant'}"
                  f", torch's plain linear {'invariant' if not r['plain_variance'] else 'differs at m=' + str(r['plain_variance'])}"
                  f", probe {r['probe_s']:.2f} s at load" for r in results)
              + ". Where the engine's kernels are invariant nothing per step had to change (no cost per token).",
              "", f"Params = the decoder layers' linear weights ({results[0]['params'] / 1e6:.1f} M; the LM head "
              "runs for one position, attention's own FLOPs are not counted). Copy GB/s counts bytes read + "
              "written; weight bytes are all parameters as loaded. Prefill time includes the first decode step.",
              ""]
    return "\n".join(lines)


def write_section(text: str, out: Path) -> None:
    """Replace this script's section of ``out`` (or append it)."""
    doc = out.read_text() if out.exists() else ""
    start = doc.find(HEADER)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(HEADER))
        doc = doc[:start] + text + ("" if end < 0 else doc[end:])
    out.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    from bench.run import machine
    from model import bundled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", action="append", help="float32, bfloat16 or auto (repeatable; default both)")
    p.add_argument("--model", help="model directory (default: the bench model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--note", default="The machine is shared with other work: figures are noisy.")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model_dir = a.model or str(bundled.ensure("kvbento-bench-100m"))
    results = [measure(model_dir, d, a.prompt_tokens, a.decode_tokens, a.reps) for d in a.dtype or ["float32", "bfloat16"]]
    from model import precision

    auto = precision.pick(torch.device("cpu"))
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": machine()["cpu"],
            "threads": a.threads, "note": a.note, "auto": f"{auto.name} ({auto.reason})"}
    text = render(results, meta)
    write_section(text, a.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

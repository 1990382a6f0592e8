"""Output constraints (issue 22), in process: decode step time with 16 rows all constrained vs none,
first-compile and cached-lookup times over the test schemas, and the share of valid outputs over
sampled constrained requests. Prints a table; ``--write`` appends it to BENCHMARKS.md.

    .venv/bin/python -m bench.constraint [--model DIR] [--requests 200] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import jsonschema

from model.constraint import ConstraintSpec
from model.engine import Engine, EngineConfig
from model.loader import load
from model.types import SamplingParams
from session.request import GenerateRequest
from protocol.tools import FunctionDef, constraint as tool_constraint
from session import Session
from bench.schemas import SCHEMAS

# Long enough to keep every row decoding for the whole measurement.
LONG = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 100, "maxItems": 100}


def _specs() -> list[ConstraintSpec]:
    out = [ConstraintSpec("json", s) for s in SCHEMAS.values()]
    fns = [FunctionDef(name="get_weather", parameters=SCHEMAS["nested"]), FunctionDef(name="noop")]
    out += [tool_constraint(fns, "required", True), tool_constraint(fns, "auto", True)]
    out += [ConstraintSpec("regex", r"[A-Z]{2}-[0-9]{4}"), ConstraintSpec("choice", ["yes", "no", "maybe"])]
    return out


async def compile_times(engine: Engine) -> dict:
    """p50 of a first compilation over the specs (fresh compiler), and of a cached lookup."""
    first, cached = [], []
    for spec in _specs():
        t = time.perf_counter()
        await engine.grammars.compile(spec)
        first.append(time.perf_counter() - t)
        for _ in range(20):
            t = time.perf_counter()
            await engine.grammars.compile(spec)
            cached.append(time.perf_counter() - t)
    return {"first_p50_ms": statistics.median(first) * 1e3, "first_max_ms": max(first) * 1e3,
            "cached_p50_ms": statistics.median(cached) * 1e3, "cached_max_ms": max(cached) * 1e3,
            "specs": len(first)}


async def step_times(engine: Engine, session: Session, constrained: bool, rows: int = 16,
                     tokens: int = 48) -> tuple[list[float], list[float]]:
    """Wall times (s) of decode steps (model + postprocess) while ``rows`` sequences run, and of
    their bitmask fills."""
    times: list[float] = []
    fills: list[float] = []
    inner, masks = engine._step, engine.postprocessor._masks

    def timed() -> None:
        t = time.perf_counter()
        inner()
        if engine.scheduler.num_running == rows and engine.scheduler.prefilling is None:
            times.append(time.perf_counter() - t)

    def timed_masks(seqs):
        t = time.perf_counter()
        out = masks(seqs)
        fills.append(time.perf_counter() - t)
        return out

    engine._step, engine.postprocessor._masks = timed, timed_masks
    try:
        spec = ConstraintSpec("json", LONG) if constrained else None
        streams = []
        for i in range(rows):
            p = SamplingParams(max_new_tokens=tokens, ignore_eos=not constrained, do_sample=True, seed=i,
                               constraint=spec)
            streams.append(await session.generate(GenerateRequest(f"step-{constrained}-{i}", "Tell me a story",
                                                                  params=p, use_cache=False)))
        await asyncio.gather(*(s.collect() for s in streams))
    finally:
        engine._step, engine.postprocessor._masks = inner, masks
    return times, fills


async def validity(session: Session, n: int) -> tuple[int, int, int]:
    """(valid, finished, total) over ``n`` sampled (temperature 1) requests cycling the schemas."""
    names = sorted(SCHEMAS)
    valid = finished = 0

    async def one(i: int) -> None:
        nonlocal valid, finished
        schema = SCHEMAS[names[i % len(names)]]
        p = SamplingParams(max_new_tokens=300, do_sample=True, temperature=1.0, top_k=0, seed=1000 + i,
                           constraint=ConstraintSpec("json", schema))
        s = await session.generate(GenerateRequest(f"valid-{i}", "Give me the data.", params=p, use_cache=False))
        await s.collect()
        finished += s.finish_reason == "stop"
        try:
            jsonschema.validate(json.loads(s.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass

    for lo in range(0, n, 16):
        await asyncio.gather(*(one(i) for i in range(lo, min(n, lo + 16))))
    return valid, finished, n


async def main_async(args) -> str:
    loaded = load(args.model)
    engine = Engine(loaded, EngineConfig(max_batch_size=16, max_queue=256))
    session = Session(engine, None)
    try:
        comp = await compile_times(engine)
        await step_times(engine, session, False, tokens=8)  # warm-up
        free, bound, fills = [], [], []
        for _ in range(args.rounds):  # interleaved: the machine's load drifts
            free += (await step_times(engine, session, False))[0]
            b, f = await step_times(engine, session, True)
            bound, fills = bound + b, fills + f
        free, bound, fill = (statistics.median(x) * 1e3 for x in (free, bound, fills))
        valid, finished, total = await validity(session, args.requests) if args.requests else (0, 0, 0)
    finally:
        engine.close()
    return "\n".join([
        f"model `{args.model.rstrip('/').split('/')[-1]}`, vocabulary {loaded.model.config.vocab_size}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| decode step, 16 rows, none constrained (median) | {free:.2f} ms |",
        f"| decode step, 16 rows, all constrained by a JSON schema (median) | {bound:.2f} ms |",
        f"| ratio constrained / none | {bound / free:.3f} |",
        f"| of which the 16 bitmask fills (median per step) | {fill:.2f} ms |",
        f"| first compile, p50 over {comp['specs']} specs (schemas, tools, regex, choice) | "
        f"{comp['first_p50_ms']:.2f} ms (max {comp['first_max_ms']:.2f}) |",
        f"| cached lookup, p50 (max) | {comp['cached_p50_ms'] * 1e3:.0f} µs ({comp['cached_max_ms']:.3f} ms) |",
        f"| valid outputs, sampled at temperature 1 | {valid} / {total} ({finished} ended by EOS) |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="var/models/kvbento-tiny")
    parser.add_argument("--requests", type=int, default=200, help="sampled requests checked (0: none)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved step-time rounds")
    parser.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args(argv)
    table = asyncio.run(main_async(args))
    print(table)
    if args.write:
        with open("BENCHMARKS.md", "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

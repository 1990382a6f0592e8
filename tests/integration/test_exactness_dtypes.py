"""Exactness in every dtype the engine defaults to (float32, and bfloat16 where the CPU multiplies it
natively): on the tiny model in both, greedy 12 + 12 == 24 on the same engine, on another replica
of the same store and after a restart; a sequence alone == the same sequence in batches of several
sizes and mixtures of lengths, down to the bits of its logits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cache.entries import CacheStatus
from model.types import SamplingParams
from session.request import GenerateRequest

DTYPES = ["float32", "bfloat16"]
PROMPT = "Exactness holds in every dtype, said the engineer"
MIXED = ["a", "short prompt", "a somewhat longer prompt than the others " * 2, "the longest prompt " * 9,
         "x y z", "count 1 2 3 4 5 6 7 8 9", "once upon a time", "the end"]


@pytest.fixture(scope="module", params=DTYPES)
def loaded_in(request, tiny_model_dir):
    from model.loader import load

    return load(str(tiny_model_dir), dtype=request.param)


def open_session(loaded, cache_dir, max_batch_size=8):
    """A replica: its own engine and store client over the disk store at ``cache_dir``, with no
    in-memory copy of recent blocks (so a restore reads the stored bytes, as another replica does)."""
    from cache.factory import open_backend
    from cache.store import KVStore
    from model.engine import Engine, EngineConfig
    from session import Session

    store = KVStore(open_backend(f"disk://{cache_dir}"), loaded.fingerprint, block_tokens=8, memory_bytes=0)
    engine = Engine(loaded, EngineConfig(max_batch_size=max_batch_size, max_queue=64, prefill_chunk=16,
                                         block_tokens=8))
    return Session(engine, store), engine, store


async def generate(session, rid, prompt=PROMPT, n=12, use_cache=True):
    s = await session.generate(GenerateRequest(rid, prompt, params=SamplingParams(max_new_tokens=n),
                                               use_cache=use_cache, continue_stored=True))
    await s.collect()
    return s


def test_12_plus_12_equals_24_same_engine_other_replica_and_after_restart(loaded_in, loop, tmp_path):
    run = loop.run_until_complete
    first, engine_a, store_a = open_session(loaded_in, tmp_path)
    other, engine_b, store_b = open_session(loaded_in, tmp_path)
    try:
        full = run(generate(first, "full", n=24, use_cache=False))
        for rid, continued_on in (("same", first), ("replica", other)):
            a = run(generate(first, rid))
            b = run(generate(continued_on, rid, prompt="ignored on a hit"))
            assert b.cache_status is CacheStatus.HIT, rid
            assert b.token_ids == full.token_ids, f"{rid}: 12 + 12 != 24 in {loaded_in.dtype}"
            assert a.text + b.text == full.text
        run(generate(first, "restart"))
    finally:
        for closable in (engine_a, store_a, engine_b, store_b):
            closable.close()
    again, engine_c, store_c = open_session(loaded_in, tmp_path)  # a restarted server
    try:
        b = run(generate(again, "restart", prompt="ignored on a hit"))
        assert b.cache_status is CacheStatus.HIT and b.token_ids == full.token_ids
    finally:
        engine_c.close()
        store_c.close()


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_a_sequence_alone_equals_it_in_a_batch(loaded_in, loop, tmp_path, size):
    session, engine, store = open_session(loaded_in, tmp_path)
    # Mixed lengths, staggered: prompts prefill in 16-token chunks while others decode, rows join
    # and leave at different steps.
    prompts = [MIXED[(i * 3 + size) % len(MIXED)] for i in range(size)]
    lengths = [6 + (5 * i) % 11 for i in range(size)]
    run = loop.run_until_complete

    async def together():
        return await asyncio.gather(*(generate(session, f"b{size}-{i}", p, n, use_cache=False)
                                      for i, (p, n) in enumerate(zip(prompts, lengths))))

    try:
        batch = run(together())
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            solo = run(generate(session, f"s{size}-{i}", p, n, use_cache=False))
            assert batch[i].token_ids == solo.token_ids, f"row {i} of {size} differs in {loaded_in.dtype}"
    finally:
        engine.close()
        store.close()


def prefilled_pool(loaded, prompts):
    """A pool holding the lean step's prefill of each prompt but its last token: (pool, block
    tables, lengths, last tokens)."""
    from model.kv import StepBatch
    from model.runner import ModelRunner

    pool = ModelRunner.new_pool(loaded, 128, 16)
    tables, lens, last, free = [], [], [], 0
    for text in prompts:
        ids = loaded.tokenizer(text).input_ids
        n = len(ids) - 1
        table = list(range(free, free + n // 16 + 1))
        free += len(table)
        batch = StepBatch(pool, [table], [n], [n], True)
        loaded.decode_step(torch.tensor(ids[:-1]), batch.positions, batch, torch.tensor([n - 1]))
        tables, lens, last = tables + [table], lens + [n], last + [ids[-1]]
    return pool, tables, lens, torch.tensor(last)


@torch.inference_mode()
def test_decode_logits_of_a_row_are_the_same_bits_in_any_batch(loaded_in):
    """The strongest form: one decode step's logits for a row, alone and beside 1..7 other rows of
    other lengths, are bitwise equal (every kernel on the decode path is batch-invariant)."""
    from model.kv import StepBatch

    assert loaded_in.kernels["batch_invariant"] == "yes"  # the load-time probe of every linear shape
    step = loaded_in.decode_step
    if step is None:
        pytest.skip("no lean step here (the HF forward runs the steps)")

    def decode(size):
        pool, tables, lens, last = prefilled_pool(loaded_in, MIXED[:size])
        batch = StepBatch(pool, tables, [1] * size, [n + 1 for n in lens], True)
        return step(last, batch.positions, batch, torch.arange(size))

    alone = decode(1)
    for size in (2, 3, 4, 8):
        logits = decode(size)
        assert torch.equal(logits[0], alone[0]), (size, float((logits[0] - alone[0]).abs().max()))

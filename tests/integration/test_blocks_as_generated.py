"""The engine hands out each full KV block as soon as it is computed (``EngineRequest.on_block``),
and the session stores them while the request runs (``save_blocks_early``): a sequence cut off
mid-generation is restored from its stored blocks up to the last full one."""

import asyncio

import torch

from model.types import EngineRequest, SamplingParams
from session.request import GenerateRequest


def run(loop, coro):
    return loop.run_until_complete(coro)


def test_blocks_handed_out_during_generation_equal_the_finished_kv(engine, loop):
    eng = engine.engine
    blocks, finished = [], []

    async def on_finish(done):
        finished.append(done)

    async def go():
        eng.reserve()
        ids = engine.tokenize("Blocks as they are computed")
        req = EngineRequest("blocks-1", ids, SamplingParams(max_new_tokens=40, ignore_eos=True), len(ids),
                            on_finish=on_finish, on_block=lambda *a: blocks.append(a), block_tokens=8)
        s = eng.submit(req)
        await s.collect()
        return s

    s = run(loop, go())
    done = finished[0]
    n_kv = len(done.token_ids) - 1
    assert [b[0] for b in blocks] == list(range(0, n_kv // 8 * 8, 8))  # every full block, in order, once
    for start, ids, keys, values in blocks:
        assert ids == s.token_ids[: start + 9]
        for k, v, fk, fv in zip(keys, values, done.keys, done.values):
            assert torch.equal(k, fk[:, start:start + 8]) and torch.equal(v, fv[:, start:start + 8])


def test_blocks_are_stored_while_the_request_runs(engine, loop):
    store = engine.store

    async def go():
        req = GenerateRequest("early-1", "A long answer, stored as it goes", params=SamplingParams(
            max_new_tokens=1500, ignore_eos=True), save_blocks_early=True)
        s = await engine.generate(req)
        it = s.__aiter__()
        got = 0
        while got < 40:
            got += len((await it.__anext__()).token_ids)
        known = list(s.token_ids)
        hashes = store.hashes("public", known, (len(known) - 1) // 8)
        for _ in range(100):  # the writes in flight land
            stored = await store.count_blocks("public", hashes)
            if stored == len(hashes):
                break
            await asyncio.sleep(0.02)
        running = s.finish_reason is None and engine.engine.num_running >= 1
        await it.aclose()  # the client goes away
        while engine.engine.num_running:  # its finish (store write, lease release) runs out
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        return stored, len(hashes), running

    stored, want, running = run(loop, go())
    assert running and want >= 5 and stored == want  # every full block, before the request ended

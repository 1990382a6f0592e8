"""Exactness of the paged engine on the tiny model, in fp32 (native kernel and the torch path, the
CUDA path) and bf16: a sequence alone equals the same sequence in any batch, any mixture of
prefill chunks and decode tokens and any block sharing; 12 + 12 == 24 through the store; a pool
too small for the load makes requests wait or be preempted, never fail."""

import asyncio

import pytest

from model.types import SamplingParams
from session.request import GenerateRequest

SYSTEM = "<system> You answer briefly and politely, in plain words. </system>\n"
PROMPTS = [SYSTEM + "user: hello\nassistant:", "A", SYSTEM + "user: what is a fox?\nassistant:",
           "The quick brown fox jumps over the lazy dog " * 3, SYSTEM + "user: hi\nassistant:"]
CONFIGS = [("float32", "onednn"), ("float32", "torch"), ("bfloat16", "torch")]


def run(loop, coro):
    return loop.run_until_complete(coro)


@pytest.fixture(scope="module", params=CONFIGS, ids=["fp32-native", "fp32-torch", "bf16-torch"])
def paged(request, tiny_model_dir, tmp_path_factory):
    """A session over an engine of the given dtype and kernels: batch 4, 8-token blocks (the
    store's), 16-token chunks, 32 tokens a step."""
    from cache.factory import open_backend
    from cache.store import KVStore
    from model.engine import Engine, EngineConfig
    from model.loader import load
    from session import Session

    dtype, kernels = request.param
    m = load(str(tiny_model_dir), dtype=dtype, cpu_kernels=kernels)
    store = KVStore(open_backend(f"disk://{tmp_path_factory.mktemp('kv')}"), m.fingerprint, block_tokens=8)
    eng = Engine(m, EngineConfig(max_batch_size=4, max_queue=64, prefill_chunk=16, max_batch_tokens=32,
                                 block_tokens=8))
    yield Session(eng, store)
    eng.close()
    store.close()


def request(i, prompt, use_cache=False, rid=None, **params):
    params = {"max_new_tokens": 12, "ignore_eos": True, **params}
    return GenerateRequest(rid or f"paged-{i}", prompt, params=SamplingParams(**params),
                           use_cache=use_cache or rid is not None, named=rid is not None,
                           continue_stored=rid is not None)


async def generate(session, reqs, stagger=False):
    """Start ``reqs`` (together, or each once the previous one has its first token) and collect."""
    streams = []
    for r in reqs:
        s = await session.generate(r)
        streams.append(s)
        if stagger:
            it = s.__aiter__()
            first = await it.__anext__()
            streams[-1] = (s, it, first)
    out = []
    for s in streams:
        if isinstance(s, tuple):
            s, it, _ = s
            async for _ in it:
                pass
        else:
            await s.collect()
        out.append(s.token_ids[len(s.base_token_ids):])
    return out


def test_alone_equals_batched_mixed_and_shared(paged, loop):
    eng = paged.engine
    solo = [run(loop, generate(paged, [request(i, p)]))[0] for i, p in enumerate(PROMPTS)]
    assert all(len(s) == 12 for s in solo)
    together = run(loop, generate(paged, [request(i, p) for i, p in enumerate(PROMPTS)]))
    assert together == solo
    # Each joins while the others decode: its prefill chunks ride in their decode steps.
    staggered = run(loop, generate(paged, [request(i, p) for i, p in enumerate(PROMPTS)], stagger=True))
    assert staggered == solo
    # Through the pool's prefix cache: the system prompt's blocks are shared, not recomputed.
    before = eng.runner.num_prefilled_tokens
    shared = run(loop, generate(paged, [request(i, p, use_cache=True) for i, p in enumerate(PROMPTS)]))
    assert shared == solo
    again = run(loop, generate(paged, [request(i, p, use_cache=True) for i, p in enumerate(PROMPTS)]))
    assert again == solo
    assert eng.kv_blocks()["used"] == 0 and eng.kv_blocks()["cached"] > 0
    assert eng.runner.num_prefilled_tokens - before < 2 * sum(len(paged.tokenize(p)) - 1 for p in PROMPTS)


def test_continuation_12_plus_12_equals_24(paged, loop):
    prompt = PROMPTS[2]
    full = run(loop, generate(paged, [request(0, prompt, max_new_tokens=24)]))[0]
    a = run(loop, generate(paged, [request(0, prompt, rid="paged-cont")]))[0]
    b = run(loop, generate(paged, [request(0, "ignored", rid="paged-cont")]))[0]
    assert a + b == full
    assert paged.engine.kv_blocks()["used"] == 0


def test_a_small_pool_makes_requests_wait_not_fail(tiny_model_dir, loop, loaded):
    """A pool of a few blocks more than one max-context sequence: eight long requests at once
    take turns (waiting, preempted and computed again), and each gives its solo answer."""
    from model.engine import Engine, EngineConfig
    from session import Session

    small = Engine(loaded, EngineConfig(max_batch_size=8, block_tokens=8, prefill_chunk=16, max_batch_tokens=64,
                                        kv_cache_bytes=1))
    try:
        session = Session(small, None)
        assert small.blocks.num_blocks == -(-loaded.max_context // 8) + 1
        prompts = [f"{i}: " + "many words in a long prompt " * 40 for i in range(8)]
        reqs = [request(i, p, max_new_tokens=64) for i, p in enumerate(prompts)]
        solo = [run(loop, generate(session, [r]))[0] for r in reqs[:2]]
        together = run(loop, asyncio.wait_for(generate(session, reqs), 600))
        assert together[:2] == solo and all(len(t) == 64 for t in together)
        assert small.kv_blocks()["used"] == 0
    finally:
        small.close()


def test_a_prefix_in_the_pool_is_neither_read_nor_computed(paged, loop):
    """The next turn of a conversation on the same replica takes the pool's blocks: with the
    store's copies of them deleted it still restores all of it, and answers the same."""
    from cache import keys
    from cache.entries import CacheStatus

    prompt = SYSTEM * 3 + "user: remember this\nassistant:"
    full = run(loop, generate(paged, [request(0, prompt, max_new_tokens=16)]))[0]
    a = run(loop, generate(paged, [request(0, prompt, rid="paged-pool", max_new_tokens=8)]))[0]
    head = run(loop, paged.store.load_head("public", "paged-pool")).head
    paged.store._memory.clear()
    for h in head.blocks:
        paged.store.backend.delete(keys.block_key("public", h))
    before = paged.engine.runner.num_prefilled_tokens

    async def turn():
        s = await paged.generate(request(0, "ignored", rid="paged-pool", max_new_tokens=8))
        await s.collect()
        return s

    s = run(loop, turn())
    assert a + s.token_ids[len(s.base_token_ids):] == full
    assert s.usage.cached_tokens >= len(head.blocks) * paged.store.block_tokens
    assert s.cache_status is CacheStatus.HIT  # the session counted the pool's blocks as restored
    assert paged.engine.runner.num_prefilled_tokens - before < paged.store.block_tokens

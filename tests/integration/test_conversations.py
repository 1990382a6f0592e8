"""Conversations on the in-process session: every turn reuses what is stored and writes only what
is new; forks, appends, anchors for clients without a request_id; exactness against recomputing."""

import asyncio

import pytest

from cache import keys
from cache.entries import CacheStatus
from model.types import InvalidRequest, SamplingParams
from session.errors import Conflict, NotFound
from session.request import GenerateRequest
from tests.integration.rounding import assert_same_greedy

SYSTEM = "<system> You are a careful assistant who answers briefly. </system>\n"


def run(loop, coro):
    return loop.run_until_complete(coro)


async def turn(session, prompt, rid=None, **kw):
    params = SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 12))
    named = rid is not None
    req = GenerateRequest(rid or f"anon-{id(prompt)}", prompt, params=params, named=named, **kw)
    s = await session.generate(req)
    await s.collect()
    return s


def recompute(session, loop, prompt_ids, n):
    """The greedy answer to ``prompt_ids`` computed from scratch (no store at all)."""
    async def go():
        s = await session.generate(GenerateRequest("ref", prompt_ids=prompt_ids, use_cache=False,
                                                   params=SamplingParams(max_new_tokens=n)))
        await s.collect()
        return s
    return run(loop, go())


@pytest.mark.parametrize("named", [True, False])
def test_next_turn_reuses_the_previous_answer_sent_back_as_text(engine, loop, named):
    rid = "conv-text" if named else None
    first = SYSTEM + "user: tell me about cats\nassistant:"
    a = run(loop, turn(engine, first, rid, max_new_tokens=20))
    second = first + a.text + "\nuser: and dogs?\nassistant:"
    b = run(loop, turn(engine, second, rid, max_new_tokens=12))
    before = len(a.token_ids) - 1  # everything of turn 1 whose KV exists
    block = engine.store.block_tokens
    want = before - 16 if named else before - 16 - block
    assert b.usage.cached_tokens >= want, (b.usage.cached_tokens, before)
    assert b.cache_status in (CacheStatus.HIT, CacheStatus.PARTIAL)
    # Exact: the answer equals recomputing the same token sequence from nothing (in a half type up to
    # a rounding tie: turn 1's answer KV came from decode steps, the recomputation prefills it).
    ref = recompute(engine, loop, list(b.base_token_ids), 12)
    n = len(b.base_token_ids)
    assert_same_greedy(engine.engine.m, b.base_token_ids, b.token_ids[n:], ref.token_ids[n:])


def test_edited_history_reuses_what_still_matches(engine, loop):
    first = SYSTEM + "user: a question about the weather in Paris in spring\nassistant:"
    a = run(loop, turn(engine, first, "conv-edit", max_new_tokens=8))
    edited = SYSTEM + "user: a question about the weather in Rome in autumn\nassistant:"
    b = run(loop, turn(engine, edited, "conv-edit", max_new_tokens=8))
    assert 0 < b.usage.cached_tokens < len(a.token_ids) - 1
    assert b.cache_status is CacheStatus.PARTIAL
    ref = recompute(engine, loop, list(b.base_token_ids), 8)
    n = len(b.base_token_ids)
    assert_same_greedy(engine.engine.m, b.base_token_ids, b.token_ids[n:], ref.token_ids[n:])


def test_append_continues_with_new_text(engine, loop):
    a = run(loop, turn(engine, "Once upon a time", "conv-app", continue_stored=True, max_new_tokens=6))
    b = run(loop, turn(engine, "ignored", "conv-app", continue_stored=True, append=" The end.", max_new_tokens=6))
    tail = engine.tokenize(" The end.", special_tokens=False)
    assert b.base_token_ids == a.token_ids + tail
    assert b.usage.cached_tokens == len(a.token_ids) - 1  # only the appended text was prefilled
    # append with nothing stored means prompt + append
    c = run(loop, turn(engine, "Hello", "conv-app-new", continue_stored=True, append=" there", max_new_tokens=2))
    assert c.base_token_ids == engine.tokenize("Hello there")


def test_fork_starts_from_the_parent_and_leaves_it_untouched(engine, loop):
    a = run(loop, turn(engine, "The parent story begins", "fork-parent", continue_stored=True, max_new_tokens=8))
    parent_before = run(loop, engine.store.info("public", "fork-parent"))
    b = run(loop, turn(engine, "ignored", "fork-child", continue_stored=True, parent_request_id="fork-parent",
                       max_new_tokens=5))
    assert b.base_token_ids == a.token_ids and b.cache_status is CacheStatus.HIT
    assert run(loop, engine.store.info("public", "fork-parent")).num_tokens == parent_before.num_tokens
    assert run(loop, engine.store.info("public", "fork-child")).num_tokens == len(a.token_ids) + 5
    with pytest.raises(NotFound):
        run(loop, turn(engine, "x", "fork-2", continue_stored=True, parent_request_id="no-such-parent"))
    with pytest.raises(Conflict):
        run(loop, turn(engine, "x", "fork-child", continue_stored=True, parent_request_id="fork-parent"))
    with pytest.raises(InvalidRequest):
        run(loop, turn(engine, "x", "fork-self", continue_stored=True, parent_request_id="fork-self"))


def test_a_turn_writes_only_its_new_blocks(engine, loop):
    b = engine.store.block_tokens
    prompt = SYSTEM * 3 + "user: count the blocks\nassistant:"
    a = run(loop, turn(engine, prompt, "conv-bytes", max_new_tokens=10))
    written = []
    orig = engine.store.backend.set

    def spy(key, value, ttl=None):
        written.append(key)
        return orig(key, value, ttl)

    engine.store.backend.set = spy
    try:
        c = run(loop, turn(engine, prompt + a.text + "\nuser: more\nassistant:", "conv-bytes", max_new_tokens=10))
    finally:
        engine.store.backend.set = orig
    blocks = [k for k in written if k.endswith(":block")]
    heads = [k for k in written if k.endswith(":head")]
    new_positions = len(c.token_ids) - 1 - ((len(a.token_ids) - 1) // b) * b
    assert heads == [keys.head_key("public", "conv-bytes")]
    assert len(blocks) <= new_positions // b + 1


def test_shared_system_prompt_is_stored_once(engine, loop):
    b = engine.store.block_tokens
    system = "<system> " + "shared rules for every conversation. " * 6 + "</system>\n"
    for i in range(3):
        run(loop, turn(engine, system + f"user: question {i}\nassistant:", f"share-{i}", max_new_tokens=4))
    ids = engine.tokenize(system + "user: question 0\nassistant:")
    shared = engine.store.hashes("public", ids, len(engine.tokenize(system)) // b)
    # Each shared block is one key, whichever conversation wrote it first.
    found = engine.store.backend.exists([keys.block_key("public", h) for h in shared])
    assert all(found) and len(set(shared)) == len(shared)


def drop_pool_cache(eng):
    """Evict every cached block of the engine's pool (taking them all, then giving them back)."""
    eng.blocks.release(eng.blocks.allocate(eng.blocks.num_free + eng.blocks.num_cached))


def test_missing_or_corrupt_blocks_are_recomputed_not_wrong(engine, loop):
    prompt = SYSTEM * 2 + "user: resilience\nassistant:"
    a = run(loop, turn(engine, prompt, "conv-damage", continue_stored=True, max_new_tokens=10))
    head = run(loop, engine.store.load_head("public", "conv-damage")).head
    assert len(head.blocks) >= 3
    engine.store._memory.clear()  # force store reads
    drop_pool_cache(engine.engine)  # and no blocks from the engine's pool either
    engine.store.backend.delete(keys.block_key("public", head.blocks[2]))
    engine.store.backend.set(keys.block_key("public", head.blocks[1]), b"KVBR-garbage")
    b = run(loop, turn(engine, "ignored", "conv-damage", continue_stored=True, max_new_tokens=6))
    assert b.usage.cached_tokens == engine.store.block_tokens  # block 0 only
    assert b.cache_status is CacheStatus.PARTIAL
    ref = recompute(engine, loop, list(a.token_ids), 6)
    assert b.token_ids == ref.token_ids


def test_tenants_do_not_share_blocks_or_heads(engine, loop):
    prompt = SYSTEM * 2 + "user: private\nassistant:"
    run(loop, turn(engine, prompt, "tenant-conv", tenant="tenant-a", max_new_tokens=4))
    other = run(loop, turn(engine, prompt, "tenant-conv", tenant="tenant-b", max_new_tokens=4))
    assert other.usage.cached_tokens == 0 and other.cache_status is CacheStatus.MISS


def test_lease_lapses_after_its_holder_dies(engine, loop):
    from cache.store import LEASE_SECONDS

    async def crashed_holder():
        # A lease taken and never renewed nor released, as by a process killed mid-request.
        assert await engine.store.acquire("public", "lease-dead", "dead-token")
        s = await engine.generate(GenerateRequest("lease-dead", "hi", params=SamplingParams(max_new_tokens=2),
                                                  continue_stored=True))
        await s.collect()
        return s

    s = run(loop, asyncio.wait_for(crashed_holder(), LEASE_SECONDS + 10))
    assert s.finish_reason == "length"


def test_two_requests_on_one_request_id_never_interleave(engine, loop):
    async def both():
        reqs = [GenerateRequest("serial", "Count with me", params=SamplingParams(max_new_tokens=6), continue_stored=True)
                for _ in range(2)]
        streams = []
        for r in reqs:
            streams.append(asyncio.ensure_future(_collect(engine, r)))
        return await asyncio.gather(*streams)

    a, b = run(loop, both())
    first, second = sorted([a, b], key=lambda s: len(s.base_token_ids))
    assert second.base_token_ids == first.token_ids  # the second continued the first, whole
    ref = recompute(engine, loop, engine.tokenize("Count with me"), 12)
    assert second.token_ids == ref.token_ids


async def _collect(engine, req):
    s = await engine.generate(req)
    await s.collect()
    return s


def test_stop_keeps_every_token_the_reader_got(engine, loop):
    async def go():
        s = await engine.generate(GenerateRequest("stop-me", PROMPT_LONG, params=SamplingParams(max_new_tokens=400),
                                                  continue_stored=True))
        got, stopped = [], False
        async for d in s:
            got.extend(d.token_ids)
            if len(got) >= 5 and not stopped:
                stopped = engine.stop("public", "stop-me")
                assert stopped
        return s, got

    s, got = run(loop, go())
    assert s.finish_reason == "abort" and 5 <= len(got) < 400
    assert not engine.stop("public", "stop-me")  # nothing runs under it any more
    info = run(loop, engine.store.info("public", "stop-me"))
    assert info.num_tokens == len(s.base_token_ids) + len(got)  # exactly what the reader got


PROMPT_LONG = "A story that goes on and on: " * 4

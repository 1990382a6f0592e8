"""OpenAI's ``n`` choices share one prefill, and ``echo`` + ``logprobs`` gets the prompt's logprobs:
the session over the in-process engine on the tiny model (batch 4, 16-token prefill chunks)."""

import asyncio

import pytest
import torch

from cache.entries import CacheStatus
from model.types import SamplingParams
from protocol.openai import fan_out
from protocol.spec import merge
from session.request import GenerateRequest
from tests.integration.rounding import logit_tolerance

PROMPT = "The quick brown fox jumps over the lazy dog, and then"


def run(loop, coro):
    return loop.run_until_complete(coro)


def choices(n, prompt=PROMPT, use_cache=False, **params):
    """The engine requests of one OpenAI call with ``n`` choices (anonymous, as the dialect makes
    them)."""
    req = GenerateRequest("cmpl-test", prompt, params=SamplingParams(**params), use_cache=use_cache,
                          named=False)
    return fan_out(req, n)


async def collect(session, reqs):
    streams = await session.generate_choices(reqs)
    await asyncio.gather(*(s.collect() for s in streams))
    return streams


def generated(stream):
    return stream.token_ids[len(stream.base_token_ids):]


def prefilled(session, loop, reqs):
    """The streams of ``reqs`` and the positions the runner prefilled for them."""
    before = session.engine.runner.num_prefilled_tokens
    streams = run(loop, collect(session, reqs))
    return streams, session.engine.runner.num_prefilled_tokens - before


def assert_released(session):
    eng = session.engine
    assert eng.num_running == 0 and eng.num_waiting == 0 and eng.kv_blocks()["used"] == 0


@pytest.mark.parametrize("n", [4, 6])  # 6 > batch 4: two choices wait for a slot, holding shared blocks
def test_n_choices_prefill_the_prompt_once(engine, loop, n):
    one, cost_one = prefilled(engine, loop, choices(1, max_new_tokens=6))
    many, cost_many = prefilled(engine, loop, choices(n, max_new_tokens=6))
    assert cost_one == len(one[0].base_token_ids) - 1
    assert cost_many == cost_one
    # Greedy: every choice is the single answer.
    assert [generated(s) for s in many] == [generated(one[0])] * n
    assert all(s.finish_reason == "length" and s.usage.completion_tokens == 6 for s in many)
    assert_released(engine)


def test_seeded_choices_differ_and_repeat(engine, loop):
    params = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0, seed=11, ignore_eos=True)
    a, cost = prefilled(engine, loop, choices(3, **params))
    b = run(loop, collect(engine, choices(3, **params)))
    assert cost == len(a[0].base_token_ids) - 1
    assert [generated(s) for s in a] == [generated(s) for s in b]
    assert len({tuple(generated(s)) for s in a}) == 3
    # Choice i is what a lone request with seed + i gives.
    solo = run(loop, collect(engine, choices(1, **{**params, "seed": 12})))
    assert generated(solo[0]) == generated(a[1])


def test_choices_with_the_store_restore_once_and_each_saves(engine, loop):
    prompt = PROMPT + " a shared prefix for the store"
    run(loop, collect(engine, choices(1, prompt, use_cache=True, max_new_tokens=4)))
    streams, cost = prefilled(engine, loop, choices(3, prompt, use_cache=True, max_new_tokens=4))
    restored = streams[0].usage.cached_tokens
    assert restored > 0 and all(s.cache_status is not CacheStatus.MISS for s in streams)
    assert cost == len(streams[0].base_token_ids) - 1 - restored


def test_cancelling_one_choice_leaves_the_others_and_all_release(engine, loop):
    ref = run(loop, collect(engine, choices(1, max_new_tokens=8)))

    async def cancel_first():
        streams = await engine.generate_choices(choices(3, max_new_tokens=8))
        streams[0].cancel()  # may land before, during or after its prefill: the others go on
        await asyncio.gather(*(s.collect() for s in streams[1:]))
        return streams

    streams = run(loop, cancel_first())
    assert [generated(s) for s in streams[1:]] == [generated(ref[0])] * 2

    async def client_gone():
        """What the OpenAI route does when its client leaves mid-stream: close the merged deltas."""
        streams = await engine.generate_choices(choices(6, max_new_tokens=400, ignore_eos=True))
        merged = merge(streams)
        await merged.__anext__()
        await merged.aclose()
        for _ in range(600):  # the aborts land at the model thread's next step
            if not (engine.engine.num_running or engine.engine.num_waiting):
                break
            await asyncio.sleep(0.05)
        return streams

    streams = run(loop, client_gone())
    assert_released(engine)
    assert all(s.usage.completion_tokens < 400 for s in streams)  # aborted, not run to the end


def loaded_logit_scale(loaded, ids) -> float:
    with torch.inference_mode():
        return float(loaded.model(torch.tensor([ids])).logits.float().abs().max())


def direct_logprobs(loaded, ids):
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], lp


def test_prompt_logprobs_match_the_model_even_on_a_cache_hit(engine, loaded, loop):
    prompt = PROMPT * 2  # several 16-token prefill chunks
    run(loop, collect(engine, choices(1, prompt, use_cache=True, max_new_tokens=3)))
    streams, cost = prefilled(engine, loop, choices(2, prompt, use_cache=True, max_new_tokens=3,
                                                   logprobs=1, prompt_logprobs=2))
    s = streams[0]
    ids = s.base_token_ids
    # Nothing restored: every position's logits are computed (once, for both choices).
    assert s.usage.cached_tokens == 0 and s.cache_status is CacheStatus.MISS and cost == len(ids) - 1
    entries = s.prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    assert [e.token_id for e in entries[1:]] == ids[1:]
    want, lp = direct_logprobs(loaded, ids)
    # One forward vs 16-token chunks: the same arithmetic in another order. A log-softmax moves by
    # up to twice a logit's rounding (1e-4 in float32; in bf16 a few hundredths on the tiny model).
    tol = 1e-4 if loaded.dtype == torch.float32 else 2 * logit_tolerance(loaded.dtype, loaded_logit_scale(loaded, ids))
    assert [e.logprob for e in entries[1:]] == pytest.approx(want, abs=tol)
    for i, e in enumerate(entries[1:]):
        top = lp[i].topk(2)
        assert [x for _, x in e.top] == pytest.approx(top.values.tolist(), abs=tol)
        if float(top.values[0] - top.values[1]) > tol:  # no tie within rounding: the same order
            assert [t for t, _ in e.top] == top.indices.tolist()
    assert streams[1].prompt_logprobs == entries
    # Without the ask there are none, and the prefill keeps only the last position's logits.
    plain = run(loop, collect(engine, choices(1, prompt, max_new_tokens=2)))
    assert plain[0].prompt_logprobs is None

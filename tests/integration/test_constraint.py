"""Output constraints in the engine on the tiny model: every answer matches its schema, regex or
choice, greedy and sampled, alone and batched with unconstrained rows; compilation is cached;
what the library cannot enforce is refused by name; vLLM's min_tokens holds off stop strings."""

import asyncio
import json
import math
import re

import jsonschema
import pytest

from bench.schemas import SCHEMAS
from model.constraint import ConstraintSpec, GrammarError
from model.types import SamplingParams
from session.request import GenerateRequest

PROMPT = "Hello world, how are you?"



def run(loop, coro):
    return loop.run_until_complete(coro)


async def generate(engine, spec, rid, **params):
    params.setdefault("max_new_tokens", 200)
    s = await engine.generate(GenerateRequest(rid, PROMPT, params=SamplingParams(constraint=spec, **params),
                                              use_cache=False))
    await s.collect()
    return s


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_holds_greedy_and_sampled(engine, loop, name):
    schema = SCHEMAS[name]
    spec = ConstraintSpec("json", schema)

    async def go():
        runs = [generate(engine, spec, f"js-{name}-g")]
        runs += [generate(engine, spec, f"js-{name}-{i}", do_sample=True, temperature=1.0, top_k=0, seed=i)
                 for i in range(6)]
        return await asyncio.gather(*runs)

    for s in run(loop, go()):
        assert s.finish_reason == "stop", s.text
        jsonschema.validate(json.loads(s.text), schema)


def test_regex_and_choice_hold_next_to_unconstrained_rows(engine, loop):
    regex = ConstraintSpec("regex", r"[0-9]{3}-[a-z]{2,5}", param="structured_outputs.regex")
    choice = ConstraintSpec("choice", ["alpha", "beta gamma", "delta"], param="structured_outputs.choice")

    async def go():
        free = SamplingParams(max_new_tokens=20, ignore_eos=True)
        free_stream = await engine.generate(GenerateRequest("free", PROMPT, params=free, use_cache=False))
        constrained = [generate(engine, regex, f"re-{i}", do_sample=True, seed=i) for i in range(3)]
        constrained += [generate(engine, choice, f"ch-{i}", do_sample=True, seed=i) for i in range(3)]
        done = await asyncio.gather(*constrained)
        await free_stream.collect()
        return free_stream, done

    free_stream, done = run(loop, go())
    for s in done[:3]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", s.text), s.text
    for s in done[3:]:
        assert s.text in ("alpha", "beta gamma", "delta")
    # The unconstrained row in the same batch is exactly what it would be alone.
    alone = run(loop, _free(engine))
    assert free_stream.text == alone.text and free_stream.usage.completion_tokens == 20


async def _free(engine):
    s = await engine.generate(GenerateRequest("free-alone", PROMPT, params=SamplingParams(max_new_tokens=20,
                                                                                         ignore_eos=True),
                                              use_cache=False))
    await s.collect()
    return s


def test_a_burst_with_one_schema_compiles_once(engine, loop):
    grammars = engine.engine.grammars
    schema = {"type": "object", "properties": {"burst": {"type": "integer"}}, "required": ["burst"]}
    before = grammars.num_compiled
    spec = ConstraintSpec("json", schema)

    async def burst():
        return await asyncio.gather(*(generate(engine, spec, f"burst-{i}", max_new_tokens=20) for i in range(4)))

    run(loop, burst())
    assert grammars.num_compiled == before + 1


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "properties": {"x": {"type": "strin"}}}, "strin"),
])
def test_what_cannot_be_enforced_is_refused_by_name(engine, loop, schema, named):
    with pytest.raises(GrammarError) as e:
        run(loop, generate(engine, ConstraintSpec("json", schema, param="response_format.json_schema"), "bad"))
    assert named in e.value.message and e.value.param == "response_format.json_schema"


def test_min_tokens_holds_off_stop_strings(engine, loop):
    free = run(loop, _free(engine))
    stop = free.text[2:5]
    assert stop and free.text.find(stop) < 5

    async def go(min_tokens):
        s = await engine.generate(GenerateRequest(f"min-{min_tokens}", PROMPT, params=SamplingParams(
            max_new_tokens=20, ignore_eos=True, stop=[stop], min_new_tokens=min_tokens), use_cache=False))
        await s.collect()
        return s

    early = run(loop, go(0))
    assert early.text == free.text[:free.text.find(stop)]
    late = run(loop, go(20))
    assert late.usage.completion_tokens == 20 and late.text == free.text


def _mask_ids(engine, spec, text):
    """The token ids a fresh matcher of ``spec`` allows after ``text``."""
    import torch

    from model.constraint import fill_masks

    grammars = engine.engine.grammars
    compiled = asyncio.run(grammars.compile(spec))
    c = compiled.constraint()
    assert c.matcher.consume_tokens(grammars.tokenizer.tokenize_str(text)) if text else True
    mask = fill_masks([c], grammars.executor, grammars.mask_words)
    bits = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()
    return set(bits.nonzero().flatten().tolist())


def test_every_eos_id_ends_a_complete_grammar(engine, loaded):
    allowed = _mask_ids(engine, ConstraintSpec("regex", "ab"), "ab")
    assert allowed == set(loaded.eos_token_ids) and len(allowed) == 2


def test_json_allows_no_whitespace_between_tokens(engine, loaded):
    tok = loaded.tokenizer
    blank = {i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).isspace()}
    assert blank
    for text in ("{", '{"a":', '{"a":1', "[1,"):
        spec = ConstraintSpec("json", {"type": "object"} if text.startswith("{") else {"type": "array"})
        assert not _mask_ids(engine, spec, text) & blank, text


def test_logprobs_see_the_masked_logits(engine, loop, loaded):
    async def go():
        p = SamplingParams(max_new_tokens=4, logprobs=20, constraint=ConstraintSpec("regex", "[0-9]"))
        s = await engine.generate(GenerateRequest("lp-masked", PROMPT, params=p, use_cache=False))
        entries = []
        async for delta in s:
            entries += delta.logprobs or []
        return s, entries

    s, entries = run(loop, go())
    assert s.text.isdigit() and len(s.text) == 1
    first = entries[0]
    finite = [(i, lp) for i, lp in first.top if lp > float("-inf")]
    # Only digits carry probability, and together all of it.
    assert all(loaded.tokenizer.decode([i]).isdigit() for i, _ in finite)
    assert abs(sum(math.exp(lp) for _, lp in finite) - 1.0) < 1e-4

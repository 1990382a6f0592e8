"""How the grammar library was picked (issue 22): llguidance against outlines-core on the test
schemas, with the bundled model's tokenizer: first compile (schema -> matcher ready for the first
mask) and the per-step mask of one row. xgrammar was not measured: it requires torch and triton,
which would replace this project's pinned CPU torch. outlines-core is not a dependency: install it
aside to run this (``pip install --no-deps --target /tmp/oc outlines-core==0.2.14``, then
``PYTHONPATH=/tmp/oc .venv/bin/python -m bench.grammar_libs``).
"""

from __future__ import annotations

import json
import random
import statistics
import time

import llguidance
import llguidance.hf
import torch
from transformers import AutoTokenizer

from model.constraint import ConstraintSpec
from bench.schemas import SCHEMAS

STEPS = 60


def _walk(mask, allowed, advance, steps: int = STEPS) -> list[float]:
    """Time ``mask()`` (the step's bitmask) over a random walk of ``allowed()`` tokens."""
    rnd, out = random.Random(0), []
    for _ in range(steps):
        t = time.perf_counter()
        mask()
        out.append(time.perf_counter() - t)
        ids = allowed()
        if not ids:
            break
        advance(rnd.choice(ids))
    return out


def llg(tok, schema) -> tuple[float, float]:
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=tok.eos_token_id)
    t = time.perf_counter()
    m = llguidance.LLMatcher(lt, ConstraintSpec("json", schema).grammar(), log_level=0)
    first = time.perf_counter() - t
    if m.is_error():
        raise ValueError(m.get_error())
    mask = torch.zeros((1, (len(tok) + 31) // 32), dtype=torch.int32)

    def allowed():
        bits = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: len(tok)]
        return [i for i in bits.nonzero().flatten().tolist() if i != tok.eos_token_id]

    return first, statistics.median(_walk(lambda: llguidance.torch.fill_next_token_bitmask(m, mask, 0), allowed,
                                          m.consume_token))


def outlines(tok, schema) -> tuple[float, float]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab: dict[str, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i != tok.eos_token_id and text not in tok.all_special_tokens:
            vocab.setdefault(text, []).append(i)
    v = Vocabulary(tok.eos_token_id, vocab)
    t = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=""), v))
    first = time.perf_counter() - t
    mask = torch.zeros((len(tok) + 31) // 32, dtype=torch.int32)
    return first, statistics.median(_walk(lambda: guide.write_mask_into(mask.data_ptr(), mask.numel(), 4),
                                          lambda: [i for i in guide.get_tokens() if i != tok.eos_token_id],
                                          guide.advance))


def main() -> int:
    tok = AutoTokenizer.from_pretrained("var/models/kvbento-tiny")
    print("| schema | llguidance compile ms | llguidance mask µs | outlines-core compile ms | outlines-core mask µs |")
    print("|---|---|---|---|---|")
    unsupported = {"uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
                   "not": {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}}
    for name, schema in sorted(SCHEMAS.items()) + sorted(unsupported.items()):
        try:
            a = llg(tok, schema)
            left = f"{a[0] * 1e3:.1f} | {a[1] * 1e6:.0f}"
        except ValueError as exc:
            left = f"refused: {str(exc)[:50]} | -"
        try:
            b = outlines(tok, schema)
            right = f"{b[0] * 1e3:.1f} | {b[1] * 1e6:.0f}"
        except Exception as exc:  # a keyword it lacks
            right = f"fails: {type(exc).__name__}: {str(exc)[:60]} | -"
        print(f"| {name} | {left} | {right} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

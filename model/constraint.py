"""The per-sequence output constraint: a JSON schema, regex, choice list or Lark grammar enforced
token by token with llguidance.

``ConstraintSpec`` is what a request asks for (plain data, in ``SamplingParams``);
``GrammarCompiler`` (one per model: it owns the tokenizer bridge) compiles a spec off the model
thread, with a timeout and a cache keyed by the spec; each ``Sequence`` gets its own
``Constraint`` (a matcher) from the compiled grammar. Every step, ``fill_masks`` writes one
token bitmask row per constrained row, which the sampler applies before anything reads the logits.
JSON is compact (no whitespace between tokens), so no schema is satisfied by endless spaces.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from model.types import InvalidRequest

# JSON as the matcher writes it: no whitespace between tokens (bounded by construction).
JSON_OPTIONS = {"whitespace_flexible": False}
CACHE_SIZE = 256  # compiled grammars kept (least recently used evicted)


class GrammarError(InvalidRequest):
    """The constraint cannot be enforced: malformed, unsupported keyword, or too slow to compile."""


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request constrains its output to.

    Attributes:
        kind: "json" (``value`` a JSON schema, a dict), "regex", "choice" (a list of strings) or
            "grammar" (Lark, llguidance's dialect, which may embed ``%json {...}``).
        param: the request field it came from, named by errors.
        trigger: when set, generation runs free until this text appears; from there on the rest
            must match (a tool call the model starts in "auto" mode).
    """

    kind: str
    value: Any
    param: str = "response_format"
    trigger: str | None = None

    def key(self) -> str:
        return json.dumps([self.kind, self.value], sort_keys=True, separators=(",", ":"))

    def grammar(self) -> str:
        """The llguidance grammar text of this spec (not yet checked)."""
        m = llguidance.LLMatcher
        if self.kind == "json":
            schema = self.value if isinstance(self.value, (dict, bool)) else json.loads(self.value)
            return m.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return m.grammar_from_regex(self.value)
        if self.kind == "choice":
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.value))
        if self.kind == "grammar":
            return m.grammar_from_lark(self.value)
        raise GrammarError(f"{self.param}: unknown constraint kind {self.kind!r}", param=self.param)


JSON_OBJECT = {"type": "object"}  # response_format json_object: any JSON object


class CompiledGrammar:
    """A checked grammar and a matcher in its start state; ``Constraint``s copy it."""

    def __init__(self, matcher: llguidance.LLMatcher, trigger: str | None,
                 tokenizer: llguidance.LLTokenizer) -> None:
        self._template = matcher
        self.trigger = trigger
        self.tokenizer = tokenizer

    def with_trigger(self, trigger: str | None) -> "CompiledGrammar":
        return self if trigger == self.trigger else CompiledGrammar(self._template, trigger, self.tokenizer)

    def constraint(self) -> "Constraint":
        return Constraint(self._template.deep_copy(), self.trigger, self.tokenizer)


class GrammarCompiler:
    """Compiles specs for one model: the tokenizer bridge is built once, on first use; compiled
    grammars are cached by spec, and concurrent requests with one spec share one compilation.

    Args:
        timeout: seconds a compilation may take; past it the request is refused (the compilation
            finishes in the background and is cached).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], timeout: float,
                 threads: int = 2) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvbento-grammar")
        self._lock = threading.RLock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self.num_compiled = 0
        self.executor = llguidance.LLExecutor(threads)  # fills a step's bitmasks in parallel
        self.mask_words = (vocab_size + 31) // 32

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def lookup(self, spec: ConstraintSpec) -> CompiledGrammar | None:
        """The cached compilation of ``spec``, if any."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        return hit.with_trigger(spec.trigger) if hit is not None else None

    async def compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        """``spec`` compiled (cached, else in a worker thread).

        Raises:
            GrammarError: the spec is malformed or uses what the library cannot enforce (the
                message names it), or it did not compile within ``timeout`` seconds.
        """
        hit = self.lookup(spec)
        if hit is not None:
            return hit
        key = spec.key()
        with self._lock:  # a burst with one spec shares one compilation (callers on any loop)
            fut = self._pending.get(key)
            if fut is None:
                fut = self._pool.submit(self._build, spec)
                self._pending[key] = fut
                fut.add_done_callback(lambda f: self._store(key, f))
        try:
            compiled = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.timeout)
        except asyncio.TimeoutError:
            raise GrammarError(f"{spec.param}: the constraint did not compile within {self.timeout:g} s",
                               param=spec.param) from None
        return compiled.with_trigger(spec.trigger)

    def _store(self, key: str, fut: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if not fut.cancelled() and fut.exception() is None:
                self._cache[key] = fut.result()
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)

    def _build(self, spec: ConstraintSpec) -> CompiledGrammar:
        try:
            grammar = spec.grammar()
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{spec.param}: {exc}", param=spec.param) from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.param}: {_first_line(matcher.get_error())}", param=spec.param)
        self.num_compiled += 1
        return CompiledGrammar(matcher, spec.trigger, self.tokenizer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid grammar"


class Constraint:
    """One sequence's matcher. Inactive (costs nothing) until its trigger text appears, when it
    has one."""

    def __init__(self, matcher: llguidance.LLMatcher, trigger: str | None,
                 tokenizer: llguidance.LLTokenizer) -> None:
        self.matcher = matcher
        self.trigger = trigger
        self.tokenizer = tokenizer
        self.is_active = trigger is None
        self._seen = ""  # the generated text's tail, while watching for the trigger

    @property
    def is_done(self) -> bool:
        """The grammar is complete and admits nothing more than EOS."""
        return self.is_active and self.matcher.is_stopped()

    def accept(self, token: int, text: str) -> bool:
        """Advance past the sampled ``token`` (whose text is ``text``). Returns False when the
        matcher cannot take it (only a token sampled without the mask, e.g. a forced EOS)."""
        if self.is_active:
            return self.matcher.consume_token(token)
        if not text:
            return True
        self._seen = (self._seen + text)[-(len(self.trigger) + len(text)):]
        at = self._seen.find(self.trigger)
        if at >= 0:
            self.is_active = True
            tail = self._seen[at + len(self.trigger):]
            if tail and not self.matcher.consume_tokens(self.tokenizer.tokenize_str(tail)):
                self.is_active = False  # not a call the grammar accepts: the answer stays text
                self.trigger = None
                return True
        return True


def fill_masks(constraints: list[Constraint], executor: llguidance.LLExecutor,
               words: int) -> torch.Tensor:
    """One bitmask row per constraint (bit j of row i: token j allowed), computed in parallel."""
    mask = torch.full((len(constraints), words), -1, dtype=torch.int32)
    llguidance.torch.fill_next_token_bitmask_par(
        executor, [(c.matcher, i) for i, c in enumerate(constraints)], mask)
    return mask


_BITS = torch.arange(32, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> None:
    """Set the logits of tokens a row's bitmask forbids to -inf, in place (``logits`` [n, vocab]
    float, ``rows`` the constrained rows, ``masks`` their bitmasks)."""
    vocab = logits.shape[-1]
    allowed = ((masks.unsqueeze(-1) >> _BITS) & 1).view(len(rows), -1)[:, :vocab].bool()
    idx = torch.tensor(rows, dtype=torch.long)
    logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))

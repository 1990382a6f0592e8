"""Plain request/response types of the engine, the errors it raises and their common base. No HTTP here: an error
carries a kind, and the server maps kinds to statuses (server/http.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


class ServingError(Exception):
    """Base of the typed errors a request can get, from any layer (the engine's below, the
    session's in session/errors.py, the protocol's in protocol/common.py). ``kind`` says what went
    wrong and picks the HTTP status (server/http.py); ``type`` is the name error bodies show clients."""

    kind: str = "internal"
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class EngineError(ServingError):
    """An error of the engine: the base of its typed errors, and itself a generation that failed."""


class InvalidRequest(EngineError):
    """The request cannot be served as asked (bad parameter, prompt too long)."""

    kind = "invalid"
    type = "invalid_request_error"


class QueueFull(EngineError):
    """The waiting queue is full; the client should retry after ``retry_after`` seconds."""

    kind = "overloaded"
    type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(EngineError):
    """The engine is loading, shutting down or failed."""

    kind = "unavailable"
    type = "unavailable_error"


@dataclass
class SamplingParams:
    """Per-request generation settings (the request-id API's generation_config, plus extras)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    # OpenAI's: subtracted from a token's logit once it was generated / per time it was generated.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Return each generated token's logprob and this many alternatives (None: no logprobs).
    logprobs: int | None = None
    # Return each prompt token's logprob (log-softmax of the raw logits) and this many alternatives.
    prompt_logprobs: int | None = None
    # The output must match this (a model.constraint.ConstraintSpec); ``Engine.prepare`` sets
    # ``grammar`` to its compilation, from which each sequence takes its own matcher.
    constraint: Any = None
    grammar: Any = None

    def validate(self, max_new_tokens_limit: int) -> None:
        """Check every parameter against its declared range (model/params.py), and the rules
        between them. Raises InvalidRequest naming the field."""
        from model.params import PARAMS

        def bad(name: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"generation_config.{name} {why}", param=name)

        for name, p in PARAMS.items():
            value = getattr(self, name)
            if not p.contains(value):
                raise bad(name, f"must be in {p.describe()}, got {value}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise bad("max_new_tokens", f"must be between 1 and {max_new_tokens_limit}, got {self.max_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"must be between 0 and max_new_tokens, got {self.min_new_tokens}")
        if self.num_beams > 1 and self.do_sample:
            raise bad("num_beams", "beam search runs without sampling: set do_sample to false")
        if self.num_beams > 1 and self.constraint is not None:
            raise bad("num_beams", "beam search cannot be combined with an output constraint")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise bad("stop", "allows at most 16 non-empty strings of at most 256 characters")


@dataclass
class EngineRequest:
    """What the engine runs: token ids, the KV of a prefix of them, sampling parameters (the session
    builds it from a ``session.request.GenerateRequest``).

    ``prefix`` holds the states of positions ``[prefix_from, num_cached)`` as consecutive chunks,
    each per layer ``[kv_heads, n, head_dim]``; the positions before ``prefix_from`` are blocks
    the engine's pool holds (``Engine.cached_blocks``), or computes again if it lost them.
    ``block_hashes`` are the store's hashes of the sequence's full blocks (the pool names blocks by
    them) and ``hasher(token_ids, num_blocks, known)`` extends them to generated blocks. On finish
    the engine hands the KV of positions ``[kv_from, kept - 1)`` to ``on_finish`` (when set)
    before the final delta.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int
    num_cached: int = 0
    prefix: list[tuple[list[Any], list[Any]]] = field(default_factory=list)
    kv_from: int = 0
    on_finish: Callable[["Finished"], Awaitable[None]] | None = None
    prefix_from: int = 0
    block_hashes: list[str] = field(default_factory=list)
    hasher: Callable[[list[int], int, list[str]], list[str]] | None = None
    # Called on the model thread, with (start, token_ids[:start + block_tokens + 1], keys, values),
    # for each full block of ``block_tokens`` positions from ``kv_from`` on as soon as its KV is
    # computed (a copy on the host), so a caller can store a sequence while it runs. Must be quick.
    on_block: Callable[[int, list[int], list[Any], list[Any]], None] | None = None
    block_tokens: int = 0


@dataclass
class Finished:
    """A retired sequence: the tokens worth keeping and (when asked) their new KV."""

    token_ids: list[int]
    num_generated: int
    finish_reason: str
    keys: list[Any] | None = None
    values: list[Any] | None = None
    error: str | None = None


@dataclass
class Delta:
    """What one engine step produced for one request.

    ``text`` is new, complete UTF-8 text (never half a character); ``finish_reason`` is set on the
    last delta only: "stop" (EOS or stop string), "length", "abort" or "error".
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list | None = None  # one model.sampling.TokenLogprob per token id, when asked
    # Sent once, when the prefill is done: one TokenLogprob per prompt token, None where there are
    # no logits (the first token, a restored prefix).
    prompt_logprobs: list | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

"""What a dialect asks the session for: one generation, with the request_id and store semantics the
engine knows nothing of."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from model.types import Finished, SamplingParams


@dataclass
class GenerateRequest:
    """One generation as a dialect asks for it (the session turns it into an ``EngineRequest``).

    The prompt is ``prompt_ids``, else ``prompt`` tokenized (with the tokenizer's special tokens
    when ``special_tokens``; a rendered chat template already has them).
    """

    request_id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = "public"
    # False: generate without reading or writing the store at all.
    use_cache: bool = True
    # True: request_id names a head (read, leased, written); False: an anonymous request that
    # still reuses and leaves content-addressed blocks.
    named: bool = True
    special_tokens: bool = True
    # The request-id API's semantics: a stored sequence is continued and ``prompt`` is ignored.
    # False: the prompt is the whole conversation, matched against the stored one.
    continue_stored: bool = False
    # Text added after the stored sequence (or after ``prompt`` when nothing is stored).
    append: str | None = None
    # Start request_id as a fork of this request_id's sequence.
    parent_request_id: str | None = None
    # Store each full block of KV as soon as it is computed, not only on finish (a background
    # response: another replica can then go on from it).
    save_blocks_early: bool = False
    # Wraps the save on finish: ``gate(finished, save)`` may hold it back (a stream whose client
    # went away, kept for a resume: session/resume.py).
    finish_gate: Callable[[Finished, Callable[[Finished], Awaitable[None]]], Awaitable[None]] | None = None

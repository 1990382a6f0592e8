"""What the stateless dialects (OpenAI, Takeoff, Together, Truss, generic v1) share.

Their wire formats have no cache key, so each accepts an optional ``request_id`` body field: with it
the prompt (the whole conversation) is matched against that id's stored sequence, which then holds
the new one; without it the request still reuses (and leaves) content-addressed KV blocks.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from protocol.common import MAX_REQUEST_ID_CHARS, REQUEST_ID_PATTERN, sampling_params
from session.request import GenerateRequest

# Same rules as the request-id API's request_id, but optional.
OptionalRequestId: Any = Field(default=None, min_length=1, max_length=MAX_REQUEST_ID_CHARS, pattern=REQUEST_ID_PATTERN)


def engine_request(prefix: str, request_id: str | None, tenant: str, defaults: dict[str, Any],
                   overrides: dict[str, Any], *, prompt: str | None = None,
                   prompt_ids: list[int] | None = None, special_tokens: bool = True,
                   parent_request_id: str | None = None) -> GenerateRequest:
    """The engine request of one dialect call.

    Args:
        prefix: names the dialect in generated ids (``"cmpl"``, ``"gen"``...).
        request_id: the body's ``request_id``: the prompt is the whole conversation, matched
            against that request_id's stored sequence, which then holds the new one. None = an
            anonymous request (it still reuses and leaves content-addressed KV blocks).
        overrides: sampling fields keyed like ``SamplingParams``; None values keep the defaults.
        special_tokens: tokenize ``prompt`` with the tokenizer's special tokens (False for a
            rendered chat template, which has them).
    """
    named = bool(request_id)
    rid = request_id if named else f"{prefix}-{uuid.uuid4().hex}"
    return GenerateRequest(request_id=rid, prompt=prompt, prompt_ids=prompt_ids,
                           params=sampling_params(defaults, overrides), tenant=tenant, named=named,
                           special_tokens=special_tokens, parent_request_id=parent_request_id)


def sampling_switch(temperature: float | None) -> bool | None:
    """``do_sample`` implied by a dialect's temperature: > 0 samples, 0 is greedy, None = default."""
    return None if temperature is None else temperature > 0

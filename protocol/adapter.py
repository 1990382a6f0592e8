"""What the stateless dialects (OpenAI, Takeoff, Together, Truss, generic v1) share.

Their wire formats have no cache key, so each accepts an optional ``request_id`` body field: with it
a request continues (and then updates) the cached sequence of that id; without it the request is a
one-off under a fresh unique id that neither reads nor writes the store.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from pydantic import Field

from model.types import Delta, EngineError, GenerateRequest
from protocol.common import sampling_params

log = logging.getLogger("kvbento.protocol")

# Same rules as the request-id API's request_id, but optional.
OptionalRequestId: Any = Field(default=None, min_length=1, max_length=256, pattern=r"^[^\s/\\]+$")


def engine_request(prefix: str, request_id: str | None, tenant: str, defaults: dict[str, Any],
                   overrides: dict[str, Any], *, prompt: str | None = None,
                   prompt_ids: list[int] | None = None) -> GenerateRequest:
    """The engine request of one dialect call.

    Args:
        prefix: names the dialect in generated ids (``"cmpl"``, ``"gen"``...).
        request_id: the body's ``request_id``; None = a one-off request (``use_cache=False``).
        overrides: sampling fields keyed like ``SamplingParams``; None values keep the defaults.
    """
    if request_id:
        rid, use_cache = request_id, True
    else:
        rid, use_cache = f"{prefix}-{uuid.uuid4().hex}", False
    return GenerateRequest(request_id=rid, prompt=prompt, prompt_ids=prompt_ids,
                           params=sampling_params(defaults, overrides), tenant=tenant, use_cache=use_cache)


def sampling_switch(temperature: float | None) -> bool | None:
    """``do_sample`` implied by a dialect's temperature: > 0 samples, 0 is greedy, None = default."""
    return None if temperature is None else temperature > 0


def renamed(exc: EngineError, names: dict[str, str]) -> EngineError:
    """``exc`` with the engine's field name (``max_new_tokens``) replaced by the dialect's own
    (``max_tokens``), in ``param`` and in the message, so clients see the name they sent. Fields not
    in ``names`` keep their name but lose the request-id API's ``generation_config.`` prefix."""
    if exc.param:
        own = names.get(exc.param, exc.param)
        exc.message = exc.message.replace(f"generation_config.{exc.param}", own)
        exc.param = own
    return exc


async def pump(deltas: AsyncIterable[Delta], on_delta: Callable[[Delta], bytes | None],
               on_error: Callable[[str], bytes], end: bytes = b"",
               cancel: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """Frame an engine stream for the wire.

    Yields ``on_delta(delta)`` for each delta (None = nothing to send). An engine error delta or an
    exception becomes ``on_error(message)`` — then the stream still ends normally with ``end``. A
    client that goes away (cancel / generator close) aborts the sequence through ``cancel``.
    """
    try:
        async for delta in deltas:
            if delta.error:
                if delta.text:
                    frame = on_delta(Delta(text=delta.text, token_ids=delta.token_ids))
                    if frame:
                        yield frame
                yield on_error(delta.error)
                break
            frame = on_delta(delta)
            if frame:
                yield frame
    except (asyncio.CancelledError, GeneratorExit):
        if cancel is not None:
            cancel()
        raise
    except Exception as exc:  # an exception must not end the stream silently
        log.exception("stream failed")
        yield on_error(f"{type(exc).__name__}: {exc}")
    if end:
        yield end

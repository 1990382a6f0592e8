"""What a wire dialect is: one declarative spec, served by one shared route (server/dialects.py).

A spec names its paths, its body model and one table from the dialect's field names to the
engine's sampling parameters — the overrides a request carries and the names its errors use both
come from that table — and frames the answer: the JSON of a finished call, the chunks of a stream,
the error inside a stream, the error shape before one. Subclass ``Dialect`` and list it in
``protocol/dialects.py`` to add a dialect; add a sampling parameter to
``model/params.py`` and to the ``fields`` of the dialects that send it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from model.types import Delta, EngineError, ServingError
from protocol.adapter import engine_request, sampling_switch
from protocol.common import SSE_DONE, BodyError, error_body, internal_error, sse
from session.request import GenerateRequest
from session.session import SessionStream

log = logging.getLogger("kvbento.protocol")


@dataclass(frozen=True)
class Route:
    """One POST path of a dialect. ``stream``: fixed by the path, or None when the body decides."""

    path: str
    stream: bool | None = None
    example: Mapping[str, Any] = field(default_factory=dict)
    answer_example: Any = None
    stream_example: str | None = None
    summary: str = ""


@dataclass
class Call:
    """One accepted call as the spec sees it: the body, the caller, and what the server lends."""

    body: Any
    tenant: str
    defaults: dict[str, Any]
    model_name: str
    tokenizer: Any
    store: Any = None  # the KV store, for dialects that keep objects of their own (Responses)
    background: Any = None  # session.background.BackgroundRunner, for background responses
    resume: Any = None  # session.resume.ResumableStreams, for streams a client can pick up again
    state: dict[str, Any] = field(default_factory=dict)  # per-call scratch of the spec

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class Framing:
    """Frames one streamed call. The default writes raw text chunks (Takeoff, Truss)."""

    def __init__(self, spec: "Dialect", call: Call, streams: list[SessionStream]) -> None:
        self.spec, self.call, self.streams = spec, call, streams

    def head(self) -> list[bytes]:
        return []

    def chunk(self, index: int, delta: Delta) -> bytes | None:
        return delta.text.encode() if delta.text else None

    def error(self, message: str) -> bytes:
        """An error after the stream started: a visible JSON line, then the stream ends normally."""
        return ("\n" + json.dumps(internal_error(message)) + "\n").encode()

    async def tail(self, failed: bool) -> list[bytes]:
        return []


class SseFraming(Framing):
    """Server-Sent Events: ``spec.event`` per delta, ``data: [DONE]`` at the end."""

    def chunk(self, index: int, delta: Delta) -> bytes | None:
        ev = self.spec.event(self.call, self.streams[index], delta, self.state(index))
        return sse(ev) if ev is not None else None

    def state(self, index: int) -> dict[str, Any]:
        return self.call.state.setdefault(f"stream{index}", {})

    def error(self, message: str) -> bytes:
        return sse(self.spec.stream_error(message))

    async def tail(self, failed: bool) -> list[bytes]:
        return [SSE_DONE]


class Dialect:
    """A wire dialect. Class attributes declare it; override the hooks a dialect needs."""

    name: ClassVar[str]
    body: ClassVar[type[BaseModel]]
    routes: ClassVar[tuple[Route, ...]]
    # Engine sampling parameter -> the dialect's field(s) carrying it (the first one set wins).
    fields: ClassVar[Mapping[str, str | tuple[str, ...]]] = {}
    prompt_field: ClassVar[str] = "prompt"
    id_prefix: ClassVar[str] = "gen"
    media_type: ClassVar[str] = "text/plain; charset=utf-8"
    framing: ClassVar[type[Framing]] = Framing
    stream_field: ClassVar[str | None] = "stream"

    # -- request ---------------------------------------------------------------------------
    @staticmethod
    def authorization(header: str | None) -> str | None:
        """The Authorization header as a bearer key (dialects with their own scheme convert it)."""
        return header

    def is_stream(self, body: Any) -> bool:
        return bool(getattr(body, self.stream_field, False)) if self.stream_field else False

    def overrides(self, body: Any) -> dict[str, Any]:
        """The sampling overrides a body carries, from the ``fields`` table."""
        out: dict[str, Any] = {}
        for engine, wire in self.fields.items():
            for name in (wire,) if isinstance(wire, str) else wire:
                value = getattr(body, name, None)
                if value is not None:
                    out[engine] = value
                    break
        if "temperature" in out:
            out["do_sample"] = sampling_switch(out["temperature"])
        return out

    def param_name(self, engine: str, body: Any = None) -> str:
        """The dialect's name of an engine parameter, for error messages: of several names (chat's
        max_completion_tokens and max_tokens), the one ``body`` set."""
        wire = self.fields.get(engine, engine)
        if isinstance(wire, str):
            return wire
        return next((name for name in wire if getattr(body, name, None) is not None), wire[0])

    def renamed(self, exc: ServingError, body: Any = None) -> ServingError:
        """``exc`` naming the field the client sent in ``body``, not the engine's parameter (a
        BodyError names the body's own field already)."""
        if exc.param and not isinstance(exc, BodyError):
            own = self.param_name(exc.param, body)
            exc.message = exc.message.replace(f"generation_config.{exc.param}", own)
            exc.param = own
        return exc

    async def requests(self, call: Call) -> list[GenerateRequest]:
        """The engine requests of one call (several for n choices or a batch).

        Raises:
            BodyError: ``parent_request_id`` without the ``request_id`` to fork into.
        """
        body = call.body
        rid, parent = getattr(body, "request_id", None), getattr(body, "parent_request_id", None)
        if parent and not rid:
            raise BodyError("parent_request_id forks into a request_id: send request_id too",
                            param="parent_request_id")
        return [engine_request(self.id_prefix, rid, call.tenant, call.defaults, self.overrides(body),
                               prompt=getattr(body, self.prompt_field), parent_request_id=parent)]

    # -- answers ---------------------------------------------------------------------------
    async def answer(self, call: Call, streams: list[SessionStream], logprobs: list[list]) -> Any:
        """The JSON answer of a finished, non-streamed call."""
        raise NotImplementedError

    def event(self, call: Call, stream: SessionStream, delta: Delta, state: dict[str, Any]) -> Any | None:
        """One SSE event for ``delta`` (SSE dialects), None for nothing to send."""
        raise NotImplementedError

    def stream_error(self, message: str) -> Any:
        return internal_error(message)

    def error_body(self, exc: ServingError) -> dict[str, Any]:
        """The error shape of a refused call."""
        return error_body(exc)

    def headers(self, streams: list[SessionStream]) -> dict[str, str]:
        return {"X-KV-Cache": streams[0].cache_status.value}

    # -- the call's life: start, then collect or stream --------------------------------------
    async def start(self, call: Call, session: Any) -> list[SessionStream]:
        """Start every engine request of the call, or none: a refused one cancels the others."""
        reqs = await self.requests(call)
        started = await asyncio.gather(*(session.generate(r) for r in reqs), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            for r in started:
                if isinstance(r, SessionStream):
                    r.cancel()
            raise failed[0]
        return started

    async def collect(self, call: Call, streams: list[SessionStream]) -> Any:
        """Drain the streams and build the answer.

        Raises:
            EngineError: a stream ended in an engine error.
        """
        async def drain(s: SessionStream) -> list:
            entries: list = []
            async for delta in s:
                entries.extend(delta.logprobs or [])
            return entries

        logprobs = await asyncio.gather(*(drain(s) for s in streams))
        for s in streams:
            if s.error:
                raise EngineError(s.error)
        return await self.answer(call, streams, logprobs)

    async def frames(self, call: Call, streams: list[SessionStream]) -> AsyncIterator[bytes]:
        """The streamed answer. An engine error becomes the dialect's in-stream error, after which
        the stream still ends normally; a client that goes away aborts every sequence."""
        framing = self.framing(self, call, streams)
        for frame in framing.head():
            yield frame
        failed = False
        merged = merge(streams)
        try:
            async for i, delta in merged:
                if delta.error:
                    if delta.text or delta.logprobs:
                        frame = framing.chunk(i, Delta(text=delta.text, token_ids=delta.token_ids,
                                                       logprobs=delta.logprobs))
                        if frame:
                            yield frame
                    yield framing.error(delta.error)
                    failed = True
                    break
                frame = framing.chunk(i, delta)
                if frame:
                    yield frame
        finally:  # client gone or a choice failed: stop the others now, not at GC
            await merged.aclose()
        for frame in await framing.tail(failed):
            yield frame


async def merge(streams: list[SessionStream]) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of several streams as they come, tagged with the stream's index. An exception in a
    stream becomes an error delta (it must not end the answer silently); closing the iterator (client
    gone) cancels the readers, which aborts the sequences still running."""
    if len(streams) == 1:  # the common case, without tasks in between
        try:
            async for delta in streams[0]:
                yield 0, delta
        except (asyncio.CancelledError, GeneratorExit):
            streams[0].cancel()
            raise
        except Exception as exc:
            log.exception("stream failed")
            yield 0, Delta(finish_reason="error", error=f"{type(exc).__name__}: {exc}")
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def read(i: int, s: SessionStream) -> None:
        try:
            async for delta in s:
                await queue.put((i, delta))
        except Exception as exc:
            log.exception("stream failed")
            await queue.put((i, Delta(finish_reason="error", error=f"{type(exc).__name__}: {exc}")))
        finally:
            await queue.put((i, None))

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    try:
        open_ = len(readers)
        while open_:
            i, delta = await queue.get()
            if delta is None:
                open_ -= 1
            else:
                yield i, delta
    finally:
        for r in readers:
            r.cancel()

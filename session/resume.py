"""Streams a client can pick up again (the request-id API's ``POST /api/generate/resume``).

A streamed call whose client goes away keeps generating for ``grace_seconds``; a client resumes it
by request_id from a character offset of what was streamed, while it runs and for
``grace_seconds`` after its end (its text is kept here, on the replica that runs it: the
request_id's lease and the load balancer's hash on it already pin the request_id to this replica).
Later, or on another replica, the request_id's record answers with the text of the output tokens
it kept (what the client got, or all of it once a resumed client read to the end).

When nobody resumes, the record is what it was before resuming existed: the prompt and the tokens
delivered before the disconnect. A generation still running when the window lapses is aborted
keeping those tokens; one that ended inside the window has its save held back (``gate``) and
written, cut to them, when the window lapses, or whole as soon as a resumed client read to the
end. Its lease is held until then, so the request_id's next call sees exactly that record; a new
call on the request_id ends the window at once (``end_window``).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from cache.entries import CacheStatus
from cache.store import KVStore
from model.types import Delta, Finished, InvalidRequest
from session.errors import NotFound, StoreUnavailable

log = logging.getLogger("kvbento.resume")

OnFinish = Callable[[Finished], Awaitable[None]]


def cut(done: Finished, num_generated: int) -> Finished:
    """``done`` keeping only its first ``num_generated`` generated tokens (and their KV)."""
    drop = done.num_generated - num_generated
    if drop <= 0:
        return done
    keep = len(done.token_ids) - drop
    out = Finished(done.token_ids[:keep], num_generated, done.finish_reason, error=done.error)
    if done.keys is not None and done.keys and done.keys[0].shape[1] >= drop:
        # Positions are dim 1 of each layer's (heads, positions, dim) KV, the last ones are the cut tokens'.
        n = done.keys[0].shape[1] - drop
        out.keys, out.values = [k[:, :n] for k in done.keys], [v[:, :n] for v in done.values]
    return out


class Resumable:
    """One streamed call's text, as pieces (the head, then one per delta), and who reads it."""

    def __init__(self, registry: "ResumableStreams", tenant: str, request_id: str) -> None:
        self.registry, self.tenant, self.request_id = registry, tenant, request_id
        self.text = ""
        self.ends: list[int] = []  # each piece's end offset in ``text``
        self.token_ends: list[int] = []  # generated tokens up to and including each piece
        self.is_done = False
        self.is_settled = False  # the window lapsed or a new call came: the record is decided
        self.num_readers = 0
        self.num_delivered = 0  # generated tokens handed to a client (the most any reader got)
        self.changed = asyncio.Event()
        self.stream: Any = None
        self._held: tuple[Finished, OnFinish] | None = None
        self._timer: asyncio.Task | None = None
        self._pump: asyncio.Task | None = None

    # -- the generation ----------------------------------------------------------------------
    async def gate(self, done: Finished, save: OnFinish) -> None:
        """The finish gate: save at once while a client reads (or before one ever started reading:
        a stream whose response never began is saved as it always was); hold the save while none does."""
        if self.num_readers or self.stream is None:
            await save(done)
        elif self.is_settled:
            await save(cut(done, self.num_delivered))
        else:
            self._held = (done, save)

    def begin(self, stream: Any, head: str, render: Callable[[Delta], str],
              error: Callable[[str], str]) -> None:
        """Read ``stream`` into this record from now on, whether a client reads or not."""
        self.stream = stream
        self._add(head, 0)
        self._pump = asyncio.ensure_future(self._read(render, error))

    async def _read(self, render: Callable[[Delta], str], error: Callable[[str], str]) -> None:
        try:
            async for delta in self.stream:  # nothing else is awaited here: a cancel lands in the stream
                self._add(render(delta), len(delta.token_ids))
                if delta.error:
                    self._add(error(delta.error), 0)
                    break
        except Exception as exc:  # an exception must not end the stream silently
            log.exception("stream failed")
            self._add(error(f"{type(exc).__name__}: {exc}"), 0)
        finally:
            self.is_done = True
            self._wake()
            if not self.num_readers:
                self._arm()

    def _add(self, text: str, num_tokens: int) -> None:
        self.text += text
        self.ends.append(len(self.text))
        self.token_ends.append((self.token_ends[-1] if self.token_ends else 0) + num_tokens)
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # -- clients -------------------------------------------------------------------------------
    async def follow(self, offset: int) -> AsyncIterator[str]:
        """The text from character ``offset`` on, then the live text until the end. A piece counts
        as delivered once the next one is asked for (it was sent), as the engine counts deltas."""
        self.num_readers += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = bisect.bisect_right(self.ends, offset)  # the first piece that ends after offset
        start = offset
        try:
            while True:
                changed = self.changed
                while at < len(self.ends):
                    chunk = self.text[start:self.ends[at]]
                    if chunk:
                        yield chunk
                    self.num_delivered = max(self.num_delivered, self.token_ends[at])
                    start = self.ends[at]
                    at += 1
                if self.is_done:
                    break
                await changed.wait()
            await self._save_held()  # read to the end: the record keeps every token
        finally:
            self.num_readers -= 1
            if not self.num_readers:
                self._arm()

    def check_offset(self, offset: int) -> None:
        """Raises InvalidRequest for an offset past the text streamed so far."""
        if offset > len(self.text):
            raise InvalidRequest(f"offset: {offset} is beyond the {len(self.text)} characters streamed so "
                                 f"far for request_id {self.request_id!r}", param="offset")

    # -- the window ----------------------------------------------------------------------------
    def _arm(self) -> None:
        if self._timer is None and not self.is_settled:
            self._timer = asyncio.ensure_future(self._lapse())

    async def _lapse(self) -> None:
        await asyncio.sleep(self.registry.grace_seconds)
        self._timer = None
        if not self.num_readers:
            await self.settle()

    async def settle(self) -> None:
        """End the window: keep the delivered tokens of a generation nobody resumed, and forget it."""
        if self.is_settled:
            return
        self.is_settled = True
        if self._timer is not None:
            self._timer.cancel()
        self.registry.forget(self)
        if not self.is_done and self.stream is not None:
            engine_stream = getattr(self.stream, "stream", self.stream)  # a SessionStream's RequestStream
            engine_stream.num_delivered = self.num_delivered  # what the engine's abort keeps
            engine_stream.cancel()
        await self._save_held()

    async def _save_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            done, save = held
            await save(cut(done, self.num_delivered))


class ResumableStreams:
    """This replica's resumable streams, by (tenant, request_id)."""

    def __init__(self, grace_seconds: float, store: KVStore | None = None,
                 decode: Callable[[list[int]], str] = lambda ids: "") -> None:
        self.grace_seconds = grace_seconds
        self.store = store
        self.decode = decode  # token ids -> text, as the stream's deltas spell it
        self._entries: dict[tuple[str, str], Resumable] = {}

    @property
    def is_enabled(self) -> bool:
        return self.grace_seconds > 0

    async def open(self, tenant: str, request_id: str) -> Resumable:
        """A new call's record (ending the window of the request_id's previous one, if nobody reads it)."""
        await self.end_window(tenant, request_id)
        entry = Resumable(self, tenant, request_id)
        self._entries[(tenant, request_id)] = entry
        entry._arm()  # forgotten in a window unless a client starts reading it
        return entry

    async def end_window(self, tenant: str, request_id: str) -> None:
        old = self._entries.get((tenant, request_id))
        if old is not None and not old.num_readers:
            await old.settle()

    def forget(self, entry: Resumable) -> None:
        if self._entries.get((entry.tenant, entry.request_id)) is entry:
            del self._entries[(entry.tenant, entry.request_id)]

    async def find(self, tenant: str, request_id: str, offset: int) -> Resumable:
        """The request_id's resumable stream; after its window (or for a call that did not stream),
        the text its record keeps of the last call's output.

        Raises:
            NotFound: neither (never generated, another tenant's, or the record is gone).
            InvalidRequest: ``offset`` is past the text streamed so far.
            StoreUnavailable: no stream here, and the store cannot answer.
        """
        if not self.is_enabled:
            raise NotFound("resuming is off on this server (KVBENTO_RESUME_GRACE_SECONDS=0)",
                           param="request_id")
        entry = self._entries.get((tenant, request_id))
        if entry is None or entry.stream is None:
            entry = await self._recorded(tenant, request_id)
        entry.check_offset(offset)
        return entry

    async def _recorded(self, tenant: str, request_id: str) -> Resumable:
        found = await self.store.load_head(tenant, request_id) if self.store is not None else None
        if found is not None and found.status is CacheStatus.UNAVAILABLE:
            raise StoreUnavailable()
        if found is None or found.head is None:
            raise NotFound(f"no stream or record for request_id {request_id!r}", param="request_id")
        head = found.head
        entry = Resumable(self, tenant, request_id)
        entry.is_settled = entry.is_done = True  # nothing runs: nothing to keep or to time out
        generated = head.token_ids[head.num_prompt_tokens:]
        entry._add(self.decode(generated), len(generated))
        return entry

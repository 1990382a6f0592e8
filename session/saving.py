"""After the engine: what a finished request leaves in the store, and its lease given back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from cache.store import KVStore
from model.types import Finished
from session.observer import SessionObserver
from session.planning import Plan
from session.request import GenerateRequest

OnFinish = Callable[[Finished], Awaitable[None]]


def saver(store: KVStore, observer: SessionObserver, req: GenerateRequest, plan: Plan, kv_from: int,
          release: Callable[[], Awaitable[None]] | None) -> OnFinish:
    """The ``on_finish`` of a request whose store could be read: writes only the blocks not yet
    stored, then the head (a named request's) or the anchor (an anonymous one's, at its prompt's
    end), then calls ``release``."""
    prompt_blocks = (len(plan.token_ids) - 1) // store.block_tokens

    async def save(done: Finished) -> None:
        try:
            if done.keys is None:
                return  # nothing computed (aborted while waiting): the store keeps what it has
            unchanged = plan.head is not None and done.token_ids == plan.head.token_ids
            if unchanged and req.named and not req.parent_request_id:
                return
            anchor_at = prompt_blocks if not req.named and done.num_generated and prompt_blocks else 0
            saved = await store.save(
                req.tenant, done.token_ids, plan.num_prompt_tokens, (done.keys, done.values), kv_from,
                known_blocks=plan.known_blocks, request_id=req.request_id if req.named else None,
                anchor_at=anchor_at, created_at=plan.created_at)
            observer.on_store_write(saved.seconds, saved.nbytes, saved.ok)
        finally:
            if release is not None:
                await release()

    return save


def block_saver(store: KVStore, observer: SessionObserver, req: GenerateRequest, plan: Plan):
    """The ``on_block`` of a request that stores its KV as it goes: each full block is written as
    soon as it is computed (content-addressed, so the finish's save and any replica's restore find
    it). Called on the model thread; the write runs on the event loop."""
    loop = asyncio.get_running_loop()

    async def save(start: int, token_ids: list[int], keys: list, values: list) -> None:
        saved = await store.save(req.tenant, token_ids, plan.num_prompt_tokens, (keys, values), start,
                                 known_blocks=plan.known_blocks[: start // store.block_tokens])
        observer.on_store_write(saved.seconds, saved.nbytes, saved.ok)

    def on_block(start: int, token_ids: list[int], keys: list, values: list) -> None:
        if not loop.is_closed():  # a server shutting down: the finish's save (if any) has it all
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(save(start, token_ids, keys, values)))

    return on_block


def releaser(release: Callable[[], Awaitable[None]]) -> OnFinish:
    """The ``on_finish`` of a leased request that writes nothing: gives the lease back."""

    async def on_finish(_: Finished) -> None:
        await release()

    return on_finish


__all__ = ["OnFinish", "block_saver", "releaser", "saver"]

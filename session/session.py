"""The session layer: one request's conversation logic between the dialects and the engine.

For every generation it decides the token sequence, restores the longest stored prefix of it and
leaves the new KV behind:

- a request_id names a *head*: requests on it are serialized by a lease (renewed while the request
  runs, so it lapses within seconds of a crashed holder), and the head gives token-exact reuse of
  its whole previous sequence — matched by text when the client sends the conversation back as
  text, so the previous answer's own token ids (and their KV) are kept;
- every request, named or not, reuses content-addressed blocks of its prefix, and an anonymous one
  finds the previous turn's answer through the anchor head that turn left;
- on finish only the blocks not yet stored are written, then the head.

Missing, evicted or corrupt pieces shorten the restored prefix; they never change the output.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from cache.base import BackendUnavailable
from cache.store import LEASE_SECONDS, CacheStatus, Head, KVStore
from model.engine import Engine, RequestStream
from model.types import (
    Conflict, EngineRequest, Finished, GenerateRequest, InvalidRequest, NotFound, RequestBusy,
)

log = logging.getLogger("kvbento.session")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Lease:
    """A held request_id lease, renewed in the background until released."""

    def __init__(self, store: KVStore, tenant: str, request_id: str, token: str) -> None:
        self.store, self.tenant, self.request_id, self.token = store, tenant, request_id, token
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            if not await self.store.renew(self.tenant, self.request_id, self.token):
                log.warning("lost the lease on a request_id while its request ran")
                return

    async def release(self) -> None:
        self._task.cancel()
        await self.store.release(self.tenant, self.request_id, self.token)


class Plan:
    """What one request will run: its tokens, the restored prefix and where it came from."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.num_prompt_tokens = 0
        self.head: Head | None = None  # the stored sequence this request extends, if any
        self.created_at: float | None = None
        self.num_cached = 0
        self.chunks: list = []
        self.known_blocks: list[str] = []
        self.status = CacheStatus.MISS
        self.read_bytes = 0
        self.read_seconds = 0.0
        self.local_tokens = 0
        self.found_by = "blocks"  # head, anchor or blocks: where the restored prefix was found


class Session:
    """Serves ``GenerateRequest``s: lease, prefix restore, engine run, store write."""

    def __init__(self, engine: Engine, store: KVStore | None, *, lease_wait_seconds: float = 30.0) -> None:
        self.engine = engine
        self.store = store
        self.tokenizer = engine.m.tokenizer
        self.lease_wait_seconds = lease_wait_seconds
        # Named requests running here, so a client can stop one by its request_id (one at a time
        # per request_id: the lease serializes them).
        self._running: dict[tuple[str, str], RequestStream] = {}

    def stop(self, tenant: str, request_id: str) -> bool:
        """Stop the request running here under ``request_id``, keeping what it generated; False
        when none runs on this replica."""
        stream = self._running.get((tenant, request_id))
        if stream is None:
            return False
        stream.stop()
        return True

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special_tokens).input_ids)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def align(self, text: str, stored: list[int], special_tokens: bool = False) -> tuple[list[int], int]:
        """Tokens for ``text`` that start with the longest run of ``stored`` whose text begins
        ``text`` (the stored answer's own ids, not a re-tokenization of it), and that run's length.

        With ``special_tokens`` the tokenizer's own leading tokens (a BOS) come first, as they do
        when ``text`` is tokenized alone."""
        if special_tokens:
            lead = self.tokenize("", special_tokens=True)
            if stored[: len(lead)] != lead:
                return self.tokenize(text, special_tokens=True), 0
            ids, k = self.align(text, stored[len(lead):])
            return lead + ids, k + len(lead) if k else 0
        lo, hi = 0, len(stored)
        while lo < hi:  # the longest k with decode(stored[:k]) a prefix of text
            mid = (lo + hi + 1) // 2
            if text.startswith(self._text(stored[:mid])):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return self.tokenize(text, special_tokens=False), 0
        rest = text[len(self._text(stored[:lo])):]
        return stored[:lo] + (self.tokenize(rest, special_tokens=False) if rest else []), lo

    # -- the request -----------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> RequestStream:
        """Plan, restore and start ``req``.

        Raises:
            As ``generate_choices``.
        """
        return (await self.generate_choices([req]))[0]

    async def generate_choices(self, reqs: list[GenerateRequest]) -> list[RequestStream]:
        """Plan, restore and start one request, or the n choices of one anonymous prompt (OpenAI's
        ``n``): planned once, prefilled once by the engine; each choice saves what it generated as
        a request of its own would.

        Raises:
            InvalidRequest: bad parameters, bad field combinations, or a sequence past the context.
            NotFound: ``parent_request_id`` has no stored sequence.
            Conflict: forking onto a request_id that already has one.
            QueueFull / EngineClosed: from the engine.
            RequestBusy: the request_id stayed busy with another request past the lease wait.
        """
        arrival = time.perf_counter()
        req = reqs[0]
        for r in reqs:
            self.engine.check(r.params)
        if req.parent_request_id is not None and req.parent_request_id == req.request_id:
            raise InvalidRequest("parent_request_id must differ from request_id", param="parent_request_id")
        lease: _Lease | None = None
        num_reserved = 0
        try:
            for _ in reqs:
                self.engine.reserve()
                num_reserved += 1
            use_store = req.use_cache and self.store is not None
            available = use_store
            if use_store and req.named:
                lease, available = await self._acquire(req.tenant, req.request_id)
            plan = await self._plan(req, available)
            observer = self.engine.observer
            if available:
                observer.on_cache(plan.status, plan.read_seconds, plan.read_bytes)
            else:
                plan.status = CacheStatus.UNAVAILABLE if use_store else CacheStatus.MISS
                if use_store:
                    observer.on_cache(plan.status, 0.0, 0)
            b = self.store.block_tokens if self.store is not None else 1
            kv_from = (plan.num_cached // b) * b
            engine_reqs = []
            for r in reqs:
                on_finish = self._finisher(r, plan, lease, kv_from) if available else None
                if on_finish is None and lease is not None:
                    on_finish = self._releaser(lease)
                engine_reqs.append(EngineRequest(
                    request_id=r.request_id, token_ids=plan.token_ids, params=r.params,
                    num_prompt_tokens=plan.num_prompt_tokens, num_cached=plan.num_cached, prefix=plan.chunks,
                    kv_from=kv_from, on_finish=on_finish,
                ))
            streams = self.engine.submit_choices(engine_reqs, arrival)
        except BaseException:
            for _ in range(num_reserved):
                self.engine.unreserve()
            if lease is not None:
                await lease.release()
            raise
        for stream in streams:
            stream.cache_status = plan.status
        if lease is not None:
            self._running[(req.tenant, req.request_id)] = streams[0]
        if plan.num_cached:
            # Local: every block came from this replica's memory (a head and its tail are always
            # read from the store, so a tail-only restore is a store read on any replica).
            full = (plan.num_cached // self.store.block_tokens) * self.store.block_tokens
            local = full > 0 and plan.local_tokens >= full
            observer.on_reuse("local" if local else "store", plan.num_cached)
            observer.on_prefix(plan.found_by)
        return streams

    async def _acquire(self, tenant: str, request_id: str) -> tuple[_Lease | None, bool]:
        """The request_id's lease, waiting for another holder; (None, False) when the store is down."""
        deadline = time.monotonic() + self.lease_wait_seconds
        delay = 0.005
        token = uuid.uuid4().hex
        while True:
            try:
                ok = await self.store.acquire(tenant, request_id, token)
            except BackendUnavailable:
                return None, False
            if ok:
                return _Lease(self.store, tenant, request_id, token), True
            if time.monotonic() >= deadline:
                raise RequestBusy(f"request_id {request_id!r} is busy with another request", param="request_id")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _load(self, tenant: str, request_id: str, plan: Plan) -> Head | None:
        got = await self.store.load_head(tenant, request_id)
        plan.read_bytes += got.nbytes
        plan.read_seconds += got.seconds
        if got.status is CacheStatus.UNAVAILABLE:
            raise BackendUnavailable("store unavailable")
        return got.head

    async def _plan(self, req: GenerateRequest, available: bool) -> Plan:
        plan = Plan()
        own = parent = None
        if available:
            try:
                if req.named:
                    own = await self._load(req.tenant, req.request_id, plan)
                if req.parent_request_id is not None:
                    parent = await self._load(req.tenant, req.parent_request_id, plan)
            except BackendUnavailable:
                available = False
        if req.parent_request_id is not None:
            if not available:
                raise NotFound("the KV store is unavailable: parent_request_id cannot be read",
                               param="parent_request_id")
            if parent is None:
                raise NotFound(f"no stored sequence for parent_request_id {req.parent_request_id!r}",
                               param="parent_request_id")
            if own is not None:
                raise Conflict(f"request_id {req.request_id!r} already has a stored sequence: "
                               "fork onto a new request_id", param="parent_request_id")
        base = parent or own
        text = None
        if req.continue_stored:
            if base is not None:
                extra = self.tokenize(req.append, special_tokens=False) if req.append else []
                plan.token_ids = list(base.token_ids) + extra
                plan.num_prompt_tokens = base.num_prompt_tokens
                plan.head = base
                plan.created_at = base.created_at if base is own else None
            else:
                plan.token_ids = self.tokenize((req.prompt or "") + (req.append or ""), req.special_tokens)
                plan.num_prompt_tokens = len(plan.token_ids)
        else:
            if req.prompt_ids is not None:
                plan.token_ids = list(req.prompt_ids)
            else:
                text = req.prompt or ""
                if base is not None:
                    plan.token_ids, _ = self.align(text, base.token_ids, req.special_tokens)
                else:
                    plan.token_ids = self.tokenize(text, req.special_tokens)
            plan.head = base
            plan.created_at = own.created_at if own is not None else None
            plan.num_prompt_tokens = len(plan.token_ids)
        if not plan.token_ids:
            plan.token_ids = [self.tokenizer.bos_token_id or self.engine.pad_id]
            plan.num_prompt_tokens = 1
        if len(plan.token_ids) >= self.engine.m.max_context:
            n, ctx = len(plan.token_ids), self.engine.m.max_context
            if req.continue_stored and base is not None and not req.append:
                raise InvalidRequest(f"request_id {req.request_id!r} already holds {n} tokens, the model's "
                                     f"context is {ctx}: start a new request_id", param="request_id")
            field = "append" if req.append else "prompt"
            raise InvalidRequest(f"{field} makes the sequence {n} tokens, the model's context is {ctx}", param=field)
        if available and req.params.prompt_logprobs is None:  # those need every position's logits
            try:
                await self._restore(req, plan, text)
            except BackendUnavailable:
                plan.num_cached, plan.chunks, plan.known_blocks = 0, [], []
        return plan

    async def _restore(self, req: GenerateRequest, plan: Plan, text: str | None) -> None:
        """Find and read the longest stored prefix of ``plan.token_ids``."""
        store = self.store
        b = store.block_tokens
        limit = len(plan.token_ids) - 1
        head = plan.head
        if head is None and not req.named:
            # An anonymous request: the canonical blocks first, then the anchor the previous turn
            # left at its prompt's end, whose answer tokens the client sent back as text.
            hashes = store.hashes(req.tenant, plan.token_ids, limit // b)
            j = await store.count_blocks(req.tenant, hashes)
            anchor = await store.load_anchor(req.tenant, hashes[:j])
            if anchor is not None:
                if text is not None:
                    ids, _ = self.align(text, anchor.token_ids, req.special_tokens)
                else:
                    ids = plan.token_ids
                if min(common_prefix(ids, anchor.token_ids), len(anchor.token_ids) - 1) > j * b:
                    plan.token_ids = ids
                    plan.num_prompt_tokens = len(ids)
                    limit = len(ids) - 1
                    head = anchor
        common = 0
        if head is not None:
            common = min(common_prefix(plan.token_ids, head.token_ids), len(head.token_ids) - 1, limit)
        start = head.blocks[: common // b] if head is not None else []
        hashes = store.hashes(req.tenant, plan.token_ids, limit // b, start)
        j = len(start) + await store.count_blocks(req.tenant, hashes[len(start):])
        m = max(common, j * b)
        need = m // b
        rem = m - need * b
        extra_from_head = head is not None and rem and m <= common
        to_read = hashes[:need]
        if extra_from_head and need < len(head.blocks):
            to_read = hashes[: need + 1]  # the partial last block is a slice of a stored block
        blocks, nbytes, num_local = await store.read_blocks(req.tenant, to_read, plan.token_ids)
        plan.read_bytes += nbytes
        chunks = [(blk.keys, blk.values) for blk in blocks[:need]]
        if len(blocks) < need:
            m, rem = len(blocks) * b, 0
        elif rem:
            if not extra_from_head:
                m, rem = need * b, 0
            elif need < len(head.blocks):
                if len(blocks) > need:
                    last = blocks[need]
                    chunks.append(([k[:, :rem] for k in last.keys], [v[:, :rem] for v in last.values]))
                else:
                    m, rem = need * b, 0
            else:
                chunks.append(([k[:, :rem] for k in head.tail_keys], [v[:, :rem] for v in head.tail_values]))
        plan.num_cached = m
        plan.chunks = chunks if m else []
        plan.known_blocks = hashes[: m // b]
        plan.local_tokens = min(num_local, need) * b
        stored = head.token_ids if head is not None and (head is plan.head) else None
        if m == 0:
            plan.status = CacheStatus.MISS
        elif m >= limit or (stored is not None and m >= len(stored) - 1):
            plan.status = CacheStatus.HIT
        else:
            plan.status = CacheStatus.PARTIAL
        if head is not None and 0 < m <= common:  # the head's own sequence covers what was restored
            plan.found_by = "head" if head is plan.head else "anchor"
        if head is not plan.head:
            plan.head = head  # an anchor: the sequence this one extends

    # -- after the engine ------------------------------------------------------------------
    def _finisher(self, req: GenerateRequest, plan: Plan, lease: _Lease | None, kv_from: int):
        store = self.store
        observer = self.engine.observer
        b = store.block_tokens
        prompt_blocks = (len(plan.token_ids) - 1) // b

        async def finish(done: Finished) -> None:
            try:
                if done.keys is None:
                    return  # nothing computed (aborted while waiting): the store keeps what it has
                unchanged = plan.head is not None and done.token_ids == plan.head.token_ids
                if unchanged and req.named and plan.head is not None and not req.parent_request_id:
                    return
                anchor_at = prompt_blocks if not req.named and done.num_generated and prompt_blocks else 0
                saved = await store.save(
                    req.tenant, done.token_ids, plan.num_prompt_tokens, (done.keys, done.values), kv_from,
                    known_blocks=plan.known_blocks, request_id=req.request_id if req.named else None,
                    anchor_at=anchor_at, created_at=plan.created_at)
                observer.on_store_write(saved.seconds, saved.nbytes, saved.ok)
            finally:
                if lease is not None:
                    self._running.pop((req.tenant, req.request_id), None)
                    await lease.release()

        return finish

    def _releaser(self, lease: _Lease):
        async def release(_: Finished) -> None:
            self._running.pop((lease.tenant, lease.request_id), None)
            await lease.release()

        return release

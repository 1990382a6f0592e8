"""The session layer: one request's conversation logic between the dialects and the engine.

For every generation it decides the token sequence, restores the longest stored prefix of it and
leaves the new KV behind:

- a request_id names a *head*: requests on it are serialized by a lease (session/leases.py), and
  the head gives token-exact reuse of its whole previous sequence — matched by text when the client
  sends the conversation back as text, so the previous answer's own token ids (and their KV) are
  kept (session/alignment.py);
- every request, named or not, reuses content-addressed blocks of its prefix, and an anonymous one
  finds the previous turn's answer through the anchor head that turn left (session/planning.py,
  session/restore.py);
- on finish only the blocks not yet stored are written, then the head (session/saving.py).

Missing, evicted or corrupt pieces shorten the restored prefix; they never change the output.
"""

from __future__ import annotations

import time

from cache.entries import CacheStatus, chain_hashes
from cache.store import KVStore
from model.engine import Engine, RequestStream
from model.types import EngineRequest, InvalidRequest
from session import leases
from session.alignment import Aligner
from session.leases import Lease
from session.observer import SessionObserver
from session.planning import Plan, Planner
from session.request import GenerateRequest
from session.saving import block_saver, releaser, saver


class SessionStream:
    """A started request: the engine's ``RequestStream`` (everything it has is read through), plus
    what the session knows of it: the store lookup's ``cache_status``."""

    def __init__(self, stream: RequestStream, cache_status: CacheStatus) -> None:
        self.stream = stream
        self.cache_status = cache_status

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def __aiter__(self):
        return self.stream.__aiter__()


def _gated(gate, save):
    async def on_finish(done):
        await gate(done, save)

    return on_finish


class Session:
    """Serves ``GenerateRequest``s: lease, prefix restore, engine run, store write."""

    def __init__(self, engine: Engine, store: KVStore | None, *, observer: SessionObserver | None = None,
                 lease_wait_seconds: float = 30.0) -> None:
        self.engine = engine
        self.store = store
        self.observer = observer or SessionObserver()
        self.tokenizer = engine.tokenizer
        self.aligner = Aligner(engine.tokenizer)
        self.planner = Planner(store, self.aligner, empty_id=engine.tokenizer.bos_token_id or engine.pad_id,
                               max_context=engine.max_context, pooled=self._pooled)
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

    def tokenize(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.aligner.tokenize(text, special_tokens)

    def align(self, text: str, stored: list[int], special_tokens: bool = False) -> tuple[list[int], int]:
        """See ``Aligner.align``."""
        return self.aligner.align(text, stored, special_tokens)

    async def generate(self, req: GenerateRequest) -> SessionStream:
        """Plan, restore and start ``req``.

        Raises:
            As ``generate_choices``.
        """
        return (await self.generate_choices([req]))[0]

    async def generate_choices(self, reqs: list[GenerateRequest]) -> list[SessionStream]:
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
        self._check(reqs)
        for r in reqs:  # the output constraint compiles off the model thread (cached)
            await self.engine.prepare(r.params)
        lease: Lease | None = None
        num_reserved = 0
        try:
            for _ in reqs:
                self.engine.reserve()
                num_reserved += 1
            use_store = req.use_cache and self.store is not None
            available = use_store
            if use_store and req.named:
                lease, available = await leases.acquire(self.store, req.tenant, req.request_id,
                                                        self.lease_wait_seconds)
            plan = await self.planner.plan(req, available)
            self._settle_status(plan, available, use_store)
            streams = self.engine.submit_choices(self._engine_requests(reqs, plan, lease, available), arrival)
        except BaseException:
            for _ in range(num_reserved):
                self.engine.unreserve()
            if lease is not None:
                await lease.release()
            raise
        if lease is not None:
            self._running[(req.tenant, req.request_id)] = streams[0]
        self._report_reuse(plan)
        return [SessionStream(s, plan.status) for s in streams]

    def _check(self, reqs: list[GenerateRequest]) -> None:
        for r in reqs:
            self.engine.check(r.params)
        req = reqs[0]
        if req.parent_request_id is not None and req.parent_request_id == req.request_id:
            raise InvalidRequest("parent_request_id must differ from request_id", param="parent_request_id")

    def _settle_status(self, plan: Plan, available: bool, use_store: bool) -> None:
        """Report the store lookup; a request that could not use the store is UNAVAILABLE when it
        asked to, a MISS when it did not."""
        if available:
            self.observer.on_cache(plan.status, plan.read_seconds, plan.read_bytes)
            return
        plan.status = CacheStatus.UNAVAILABLE if use_store else CacheStatus.MISS
        if use_store:
            self.observer.on_cache(plan.status, 0.0, 0)

    def _engine_requests(self, reqs: list[GenerateRequest], plan: Plan, lease: Lease | None,
                         available: bool) -> list[EngineRequest]:
        """One engine request per choice, each saving its own result (when the store is up) and
        giving back the lease."""
        block = self.store.block_tokens if self.store is not None else 1
        kv_from = (plan.num_cached // block) * block  # the first position not in a stored block
        release = self._releasing(lease) if lease is not None else None
        hasher = self._hasher(reqs[0].tenant) if reqs[0].use_cache else None
        hashes = self._block_hashes(plan, hasher)
        out = []
        for r in reqs:
            if available:
                on_finish = saver(self.store, self.observer, r, plan, kv_from, release)
            else:
                on_finish = releaser(release) if release is not None else None
            if on_finish is not None and r.finish_gate is not None:
                on_finish = _gated(r.finish_gate, on_finish)
            on_block = block_saver(self.store, self.observer, r, plan) if available and r.save_blocks_early else None
            out.append(EngineRequest(
                request_id=r.request_id, token_ids=plan.token_ids, params=r.params,
                num_prompt_tokens=plan.num_prompt_tokens, num_cached=plan.num_cached, prefix=plan.chunks,
                kv_from=kv_from, on_finish=on_finish, prefix_from=plan.prefix_from,
                block_hashes=hashes, hasher=hasher, on_block=on_block,
                block_tokens=self.store.block_tokens if on_block else 0,
            ))
        return out

    def _hasher(self, tenant: str):
        """The engine's block naming: the store's own hash chain, at the engine's block size."""
        fp = self.store.fingerprint if self.store is not None else self.engine.m.fingerprint
        size = self.engine.block_tokens

        def hasher(token_ids: list[int], num_blocks: int, known: list[str]) -> list[str]:
            return chain_hashes(fp, tenant, token_ids, size, num_blocks, known)

        return hasher

    def _pooled(self, req: GenerateRequest, hashes: list[str]) -> int:
        """How many of the leading ``hashes`` (store blocks) the engine's pool holds, where its
        blocks are the store's (same size) and the request runs in the batch (not a beam search)."""
        if self.engine.block_tokens != self.store.block_tokens or req.params.num_beams > 1:
            return 0
        return self.engine.cached_blocks(hashes)

    def _block_hashes(self, plan: Plan, hasher) -> list[str]:
        """Hashes of the prompt's full blocks before its last position (what the pool may share)."""
        if hasher is None:
            return []
        same = self.store is not None and self.store.block_tokens == self.engine.block_tokens
        n = (len(plan.token_ids) - 1) // self.engine.block_tokens
        return hasher(plan.token_ids, n, plan.known_blocks if same else [])

    def _releasing(self, lease: Lease):
        async def release() -> None:
            self._running.pop((lease.tenant, lease.request_id), None)
            await lease.release()

        return release

    def _report_reuse(self, plan: Plan) -> None:
        if not plan.num_cached:
            return
        # Local: every block came from this replica's memory (a head and its tail are always read
        # from the store, so a tail-only restore is a store read on any replica).
        full = (plan.num_cached // self.store.block_tokens) * self.store.block_tokens
        local = full > 0 and plan.local_tokens >= full
        self.observer.on_reuse("local" if local else "store", plan.num_cached)
        self.observer.on_prefix(plan.found_by)

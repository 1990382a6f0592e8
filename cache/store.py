"""KVStore: KV in immutable content-addressed blocks plus a small head per request_id.

A sequence's KV (the states of ``token_ids[:-1]``) is cut into blocks of ``block_tokens``
positions. A block's key is a hash chain over (model fingerprint, tenant, parent block, its token
ids), so the same prefix maps to the same keys in every process and after restarts, and is stored
once per tenant. A head (one per request_id) holds the whole token sequence, its block hashes and
the KV of the tail past the last full block. An anonymous sequence leaves an *anchor* head under
the hash of its prompt's last full block, so the next turn of a client without a request_id finds
the previous answer's tokens too.

Everything missing, evicted, corrupt or from another model is a (partial) miss: the caller
recomputes from that position, never serves wrong KV. Backend outages become "unavailable" misses.
Every backend call runs on a worker thread, so the event loop never blocks on I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from cache import keys, memory
from cache.base import Backend, BackendUnavailable
from cache.codec import KVRecord, RecordError, decode, encoded
from cache.entries import Block, CacheStatus, Head, HeadResult, RecordInfo, SaveResult, chain_hashes
from cache.listing import HeadSummary, list_heads_sync, read_head, record_nbytes

log = logging.getLogger("kvbento.cache")

LEASE_SECONDS = 10.0  # renewed while its request runs, so a crashed holder's lease lapses fast


class KVStore:
    """Async facade over a blocking ``Backend`` that stores blocks and heads."""

    def __init__(self, backend: Backend, fingerprint: str, *, block_tokens: int = 64, ttl: float = 0,
                 timeout: float = 5.0, max_workers: int = 4, memory_bytes: int = 512 << 20,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.backend = backend
        self.fingerprint = fingerprint
        self.block_tokens = block_tokens
        self.ttl = ttl or None
        self.timeout = timeout
        self.lease_seconds = lease_seconds
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore")
        self._down_since: float | None = None
        # Blocks this process wrote, by key: immutable and content-addressed, so they are valid
        # without asking the store. Same-replica turns restore from here with no read at all.
        self._memory: OrderedDict[str, Block] = OrderedDict()
        self._memory_nbytes = 0
        self._memory_limit = memory_bytes

    # -- plumbing --------------------------------------------------------------------------
    async def _call(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args), self.timeout)
        except (BackendUnavailable, asyncio.TimeoutError, OSError) as exc:
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("KV store %s unavailable (%s); serving without cache until it returns",
                            self.backend.scheme, type(exc).__name__)
            raise BackendUnavailable(str(exc)) from exc
        if self._down_since is not None:
            log.warning("KV store %s is back after %.1fs", self.backend.scheme, time.time() - self._down_since)
            self._down_since = None
        return result

    def hashes(self, tenant: str, token_ids: list[int], num_blocks: int,
               start: list[str] | None = None) -> list[str]:
        return chain_hashes(self.fingerprint, tenant, token_ids, self.block_tokens, num_blocks, start)

    def prefault_reads(self, kv_bytes_per_token: int, max_tokens: int, budget_bytes: int) -> int:
        """Warm read buffers for the blocks of a ``max_tokens`` sequence, within ``budget_bytes``;
        returns how many there are."""
        record = self.block_tokens * (kv_bytes_per_token + 8) + (64 << 10)  # + ids, header, padding
        size = memory.read_buffers.buffer_size(record)
        count = min(-(-max_tokens // self.block_tokens), budget_bytes // size)
        return memory.read_buffers.prefault(record, count) if count > 0 else 0

    # -- process memory of written blocks --------------------------------------------------
    def _remember(self, key: str, block: Block) -> None:
        if key in self._memory or block.nbytes > self._memory_limit:
            return
        self._memory[key] = block
        self._memory_nbytes += block.nbytes
        while self._memory_nbytes > self._memory_limit:
            _, old = self._memory.popitem(last=False)
            self._memory_nbytes -= old.nbytes

    def in_memory(self, tenant: str, block_hash: str) -> bool:
        return keys.block_key(tenant, block_hash) in self._memory

    # -- heads -----------------------------------------------------------------------------
    def _decode_head(self, data) -> Head | None:
        try:
            rec = decode(data)
        except RecordError as exc:
            log.warning("stored head is unusable (%s); treating it as a miss", exc)
            return None
        meta = rec.meta
        if rec.fingerprint != self.fingerprint or meta.get("kind") != "head":
            return None
        blocks = meta.get("blocks")
        if (not isinstance(blocks, list) or meta.get("block_tokens") != self.block_tokens
                or len(blocks) * self.block_tokens + rec.kv_len != len(rec.token_ids) - 1):
            return None
        return Head(rec.token_ids, rec.num_prompt_tokens, [str(b) for b in blocks], rec.keys, rec.values,
                    rec.created_at, nbytes=len(data))

    async def _read_head(self, key: str) -> HeadResult:
        start = time.perf_counter()
        try:
            data = await self._call(self.backend.get, key)
        except BackendUnavailable:
            return HeadResult(CacheStatus.UNAVAILABLE, seconds=time.perf_counter() - start)
        head = self._decode_head(data) if data is not None else None
        status = CacheStatus.HIT if head is not None else CacheStatus.MISS
        return HeadResult(status, head, len(data) if data is not None else 0, time.perf_counter() - start)

    async def load_head(self, tenant: str, request_id: str) -> HeadResult:
        """The request_id's head; a corrupt, foreign or old-format head is a miss."""
        return await self._read_head(keys.head_key(tenant, request_id))

    async def load_anchor(self, tenant: str, block_hashes: list[str]) -> Head | None:
        """The anchor head left at the deepest of ``block_hashes`` (None when none is stored)."""
        if not block_hashes:
            return None
        names = [keys.anchor_key(tenant, h) for h in block_hashes]
        try:
            found = await self._call(self.backend.exists, names)
        except BackendUnavailable:
            return None
        for name, ok in zip(reversed(names), reversed(found)):
            if ok:
                got = await self._read_head(name)
                if got.head is not None:
                    return got.head
        return None

    # -- blocks ----------------------------------------------------------------------------
    async def count_blocks(self, tenant: str, block_hashes: list[str]) -> int:
        """How many of ``block_hashes``, from the first, are stored (in memory or the store)."""
        n = 0
        while n < len(block_hashes) and keys.block_key(tenant, block_hashes[n]) in self._memory:
            n += 1
        rest = block_hashes[n:]
        if not rest:
            return n
        try:
            found = await self._call(self.backend.exists, [keys.block_key(tenant, h) for h in rest])
        except BackendUnavailable:
            return n
        for ok in found:
            if not ok:
                break
            n += 1
        return n

    async def read_blocks(self, tenant: str, block_hashes: list[str],
                          token_ids: list[int]) -> tuple[list[Block], int, int]:
        """The blocks of ``block_hashes`` in order, stopping at the first one that is missing,
        corrupt or not of ``token_ids``. Returns (blocks, bytes read from the store, how many came
        from this process's memory)."""
        b = self.block_tokens
        out: list[Block] = []
        nbytes = num_local = 0
        missing: list[int] = []
        for i, h in enumerate(block_hashes):
            block = self._memory.get(keys.block_key(tenant, h))
            if block is not None:
                self._memory.move_to_end(keys.block_key(tenant, h))
            out.append(block)
            if block is None:
                missing.append(i)
        if missing:
            def fetch(i: int):
                return self.backend.get(keys.block_key(tenant, block_hashes[i]))

            try:
                datas = await asyncio.gather(*(self._call(fetch, i) for i in missing))
            except BackendUnavailable:
                datas = [None] * len(missing)
            for i, data in zip(missing, datas):
                if data is None:
                    continue
                nbytes += len(data)
                try:
                    rec = decode(data)
                except RecordError as exc:
                    log.warning("stored block is unusable (%s); recomputing from it", exc)
                    continue
                want = token_ids[i * b:(i + 1) * b]
                if (rec.fingerprint == self.fingerprint and rec.meta.get("kind") == "block"
                        and rec.token_ids == want and rec.kv_len == b):
                    out[i] = Block(block_hashes[i], rec.token_ids, rec.keys, rec.values)
        good: list[Block] = []
        for block in out:
            if block is None:
                break
            good.append(block)
        num_local = sum(1 for i in range(len(good)) if i not in missing)
        return good, nbytes, num_local

    # -- saving ----------------------------------------------------------------------------
    async def save(self, tenant: str, token_ids: list[int], num_prompt_tokens: int,
                   kv: tuple[list[torch.Tensor], list[torch.Tensor]], kv_from: int, *,
                   known_blocks: list[str], request_id: str | None = None, anchor_at: int = 0,
                   created_at: float | None = None) -> SaveResult:
        """Write the new blocks of a sequence and its head (and/or anchor).

        Args:
            token_ids: the whole sequence; ``kv`` holds the states of positions
                ``[kv_from, len(token_ids) - 1)`` (``kv_from`` is a multiple of ``block_tokens``).
            known_blocks: hashes of blocks known to be stored already (the restored prefix).
            request_id: write this request_id's head.
            anchor_at: write an anchor head under the hash of block ``anchor_at - 1`` (0 = none).
        """
        start = time.perf_counter()
        b = self.block_tokens
        n_kv = len(token_ids) - 1
        if n_kv < 0 or kv_from % b or kv_from > n_kv:
            raise ValueError("save needs kv_from a block boundary within the sequence")
        full = n_kv // b
        hashes = self.hashes(tenant, token_ids, full, known_blocks[: kv_from // b])
        new = self._new_blocks(hashes[:full], token_ids, kv, kv_from, len(known_blocks))
        lo = full * b - kv_from
        created = created_at or time.time()
        head = KVRecord(list(token_ids), num_prompt_tokens, self.fingerprint, [k[:, lo:] for k in kv[0]],
                        [v[:, lo:] for v in kv[1]], created_at=created,
                        meta={"kind": "head", "blocks": hashes, "block_tokens": b})
        names = []
        if request_id is not None:
            names.append(keys.head_key(tenant, request_id))
        if anchor_at > 0 and anchor_at <= len(hashes):
            names.append(keys.anchor_key(tenant, hashes[anchor_at - 1]))

        def work() -> tuple[int, int]:
            written, count = self._write_blocks(tenant, new, created)
            # Heads last: a head never names a block that was not written first.
            return written + self._write_head(names, head), count

        try:
            written, count = await self._call(work)
        except BackendUnavailable:
            return SaveResult(False, seconds=time.perf_counter() - start)
        for blk in new:
            self._remember(keys.block_key(tenant, blk.hash), blk)
        return SaveResult(True, written, count, time.perf_counter() - start)

    def _new_blocks(self, hashes: list[str], token_ids: list[int],
                    kv: tuple[list[torch.Tensor], list[torch.Tensor]], kv_from: int, num_known: int) -> list[Block]:
        """The full blocks of ``token_ids`` past the known ones, sliced from ``kv`` (which starts at
        position ``kv_from``)."""
        b = self.block_tokens
        k_all, v_all = kv
        out = []
        for i in range(max(num_known, kv_from // b), len(hashes)):
            lo, hi = i * b - kv_from, (i + 1) * b - kv_from
            out.append(Block(hashes[i], token_ids[i * b:(i + 1) * b], [k[:, lo:hi] for k in k_all],
                             [v[:, lo:hi] for v in v_all]))
        return out

    def _write_blocks(self, tenant: str, blocks: list[Block], created: float) -> tuple[int, int]:
        """Write the blocks neither this process nor the store has (blocking); bytes and count."""
        written = count = 0
        todo = [blk for blk in blocks if keys.block_key(tenant, blk.hash) not in self._memory]
        present = self.backend.exists([keys.block_key(tenant, blk.hash) for blk in todo]) if todo else []
        for blk, there in zip(todo, present):
            if there:
                continue
            rec = KVRecord(blk.token_ids, 0, self.fingerprint, blk.keys, blk.values, created_at=created,
                           meta={"kind": "block"})
            with encoded(rec) as data:
                self.backend.set(keys.block_key(tenant, blk.hash), data, self.ttl)
                written += len(data)
            count += 1
        return written, count

    def _write_head(self, names: list[str], head: KVRecord) -> int:
        """Write ``head`` under each of ``names`` (blocking); bytes written."""
        written = 0
        if names:
            with encoded(head) as data:
                for name in names:
                    self.backend.set(name, data, self.ttl)
                    written += len(data)
        return written

    # -- records as the API shows them -----------------------------------------------------
    async def delete(self, tenant: str, request_id: str) -> bool:
        """Remove the request_id's head (its blocks are shared content and age out by TTL/budget).

        Raises BackendUnavailable when the store cannot answer.
        """
        return await self._call(self.backend.delete, keys.head_key(tenant, request_id))

    async def info(self, tenant: str, request_id: str) -> RecordInfo | None:
        """Metadata of the request_id's head, or None. Raises BackendUnavailable when the store
        cannot answer."""
        found = await self._call(read_head, self.backend, keys.head_key(tenant, request_id))
        if found is None or found[1] is None:
            return None
        entry, header = found
        blocks = (header.get("meta") or {}).get("blocks") or []
        return RecordInfo(
            request_id=request_id,
            num_tokens=int(header.get("num_tokens", 0)),
            num_prompt_tokens=int(header.get("num_prompt_tokens", 0)),
            nbytes=record_nbytes(header, entry.nbytes, self.block_tokens),
            head_nbytes=entry.nbytes,
            num_blocks=len(blocks),
            fingerprint=str(header.get("fingerprint", "")),
            created_at=float(header.get("created_at", 0.0)),
            last_used_at=entry.last_used_at,
            expires_at=entry.expires_at,
        )

    async def list_heads(self, tenant: str, prefix: str, limit: int,
                         cursor: str | None) -> tuple[list[HeadSummary], str | None]:
        """A page of ``tenant``'s request_ids that start with ``prefix`` (cache/listing.py).

        Raises:
            ValueError: ``cursor`` is not one this backend made.
            BackendUnavailable: the store cannot answer.
        """
        return await self._call(list_heads_sync, self.backend, tenant, prefix, limit, cursor, self.block_tokens)

    # -- stored Responses-API objects: small JSON records beside the head of the same id ----
    async def load_response(self, tenant: str, response_id: str) -> bytes | None:
        """The record's bytes, or None. Raises BackendUnavailable when the store cannot answer."""
        data = await self._call(self.backend.get, keys.response_key(tenant, response_id))
        return None if data is None else bytes(data)

    async def save_response(self, tenant: str, response_id: str, data: bytes) -> None:
        """Write the record, with the store's TTL. Raises BackendUnavailable."""
        await self._call(self.backend.set, keys.response_key(tenant, response_id), data, self.ttl)

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        """Remove the record; False when there was none. Raises BackendUnavailable."""
        return bool(await self._call(self.backend.delete, keys.response_key(tenant, response_id)))

    # -- per-request_id lease (one writer at a time, across replicas) ------------------------
    async def acquire(self, tenant: str, request_id: str, token: str) -> bool:
        """Take the request_id's lease for ``token``; False when another request holds it.

        Raises BackendUnavailable when the store cannot answer.
        """
        return bool(await self._call(self.backend.acquire, keys.lease_key(tenant, request_id), token,
                                     self.lease_seconds))

    async def renew(self, tenant: str, request_id: str, token: str) -> bool:
        try:
            return bool(await self._call(self.backend.renew, keys.lease_key(tenant, request_id), token,
                                         self.lease_seconds))
        except BackendUnavailable:
            return False

    async def release(self, tenant: str, request_id: str, token: str) -> None:
        try:
            await self._call(self.backend.release, keys.lease_key(tenant, request_id), token)
        except BackendUnavailable:
            pass  # the lease lapses by itself

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.backend.close()

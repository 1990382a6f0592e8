"""KVStore: request_id-keyed records on top of any byte backend.

Builds the namespaced key, applies the codec and TTL, verifies the model fingerprint, turns
backend outages into "unavailable" misses, and runs every backend call on a worker thread so the
event loop never blocks on I/O. Tenants (API keys) get disjoint key spaces.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

from cache.base import Backend, BackendUnavailable
from cache.codec import KVRecord, RecordError, decode, encoded, read_header

log = logging.getLogger("kvbento.cache")

KEY_PREFIX = "kvbento:v1"
LEASE_SECONDS = 600.0


class CacheStatus(str, Enum):
    HIT = "hit"
    MISS = "miss"
    UNAVAILABLE = "unavailable"


@dataclass
class LoadResult:
    status: CacheStatus
    record: KVRecord | None = None
    nbytes: int = 0
    seconds: float = 0.0


@dataclass
class RecordInfo:
    request_id: str
    num_tokens: int
    num_prompt_tokens: int
    nbytes: int
    fingerprint: str
    created_at: float
    last_used_at: float | None
    expires_at: float | None


def tenant_of(api_key: str | None) -> str:
    """A stable, non-reversible tenant id for an API key ("public" without auth)."""
    if not api_key:
        return "public"
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class KVStore:
    """Async facade over a blocking ``Backend``."""

    def __init__(self, backend: Backend, fingerprint: str, *, ttl: float = 0, timeout: float = 5.0,
                 max_workers: int = 4, recent_bytes: int = 512 << 20) -> None:
        self.backend = backend
        self.fingerprint = fingerprint
        self.ttl = ttl or None
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvstore")
        self._down_since: float | None = None
        self.num_hits = self.num_misses = self.num_unavailable = 0
        # The latest records this process saved, by key (event-loop thread only). A load checks the
        # stored header's nonce (a cheap head read) and, when it is still this save, skips reading
        # and decoding the whole record: a continuation right after its request no longer waits
        # for tens of MB that the page cache is still writing back (disk) or that cross the
        # socket again (Redis). Another replica's later save changes the nonce: a full read.
        self._recent: OrderedDict[str, KVRecord] = OrderedDict()
        self._recent_nbytes = 0
        self._recent_limit = recent_bytes
        self.num_recent_hits = 0

    # -- keys ------------------------------------------------------------------------------
    @staticmethod
    def key(tenant: str, request_id: str) -> str:
        return f"{KEY_PREFIX}:{tenant}:{request_id}"

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

    @property
    def is_available(self) -> bool:
        return self._down_since is None

    # -- records ---------------------------------------------------------------------------
    def _remember(self, key: str, record: KVRecord) -> None:
        self._forget(key)
        if not record.nonce or record.nbytes > self._recent_limit:
            return
        self._recent[key] = record
        self._recent_nbytes += record.nbytes
        while self._recent_nbytes > self._recent_limit:
            _, old = self._recent.popitem(last=False)
            self._recent_nbytes -= old.nbytes

    def _forget(self, key: str) -> None:
        old = self._recent.pop(key, None)
        if old is not None:
            self._recent_nbytes -= old.nbytes

    async def _load_recent(self, key: str, start: float) -> LoadResult | None:
        """The remembered record if the store still holds that very save, else None."""
        record = self._recent.get(key)
        if record is None:
            return None
        entry = await self._call(self.backend.info, key)
        header = None
        if entry is not None and entry.head is not None:
            try:
                header = read_header(entry.head)
            except RecordError:
                pass
        if header is None or header.get("nonce") != record.nonce:
            self._forget(key)  # gone, expired, or saved again since (another replica)
            return None
        self._recent.move_to_end(key)
        self.num_hits += 1
        self.num_recent_hits += 1
        return LoadResult(CacheStatus.HIT, record, entry.nbytes, time.perf_counter() - start)

    async def load(self, tenant: str, request_id: str) -> LoadResult:
        """Read and verify the record; a corrupt or foreign record is a miss, never an error."""
        start = time.perf_counter()
        try:
            recent = await self._load_recent(self.key(tenant, request_id), start)
            if recent is not None:
                return recent
            data = await self._call(self.backend.get, self.key(tenant, request_id))
        except BackendUnavailable:
            self.num_unavailable += 1
            return LoadResult(CacheStatus.UNAVAILABLE, seconds=time.perf_counter() - start)
        if data is None:
            self.num_misses += 1
            return LoadResult(CacheStatus.MISS, seconds=time.perf_counter() - start)
        try:
            record = decode(data)
        except RecordError as exc:
            log.warning("cache record for a request_id is unusable (%s); treating it as a miss", exc)
            self.num_misses += 1
            return LoadResult(CacheStatus.MISS, nbytes=len(data), seconds=time.perf_counter() - start)
        if record.fingerprint != self.fingerprint:
            log.info("cache record was made by another model (%s); miss", record.fingerprint[:12])
            self.num_misses += 1
            return LoadResult(CacheStatus.MISS, nbytes=len(data), seconds=time.perf_counter() - start)
        self.num_hits += 1
        return LoadResult(CacheStatus.HIT, record, len(data), time.perf_counter() - start)

    async def save(self, tenant: str, request_id: str, record: KVRecord) -> bool:
        """Encode and write the record (off the event loop). False when the store is unavailable."""
        key = self.key(tenant, request_id)

        def work() -> int:
            # A pooled buffer: Backend.set is synchronous, so the bytes are not needed after it.
            with encoded(record) as data:
                self.backend.set(key, data, self.ttl)
                return len(data)

        record.nonce = uuid.uuid4().hex
        try:
            await self._call(work)
        except BackendUnavailable:
            self._forget(key)
            return False
        self._remember(key, record)
        return True

    async def delete(self, tenant: str, request_id: str) -> bool:
        """Remove the record. Raises BackendUnavailable when the store cannot answer."""
        self._forget(self.key(tenant, request_id))
        return await self._call(self.backend.delete, self.key(tenant, request_id))

    async def info(self, tenant: str, request_id: str) -> RecordInfo | None:
        """Metadata of the record, or None. Raises BackendUnavailable when the store cannot answer."""
        key = self.key(tenant, request_id)

        def work():
            entry = self.backend.info(key)
            if entry is None:
                return None
            if entry.head is not None:
                try:
                    return entry, read_header(entry.head)
                except RecordError:
                    pass  # a header longer than the head, or not a record: check the whole value
            data = self.backend.get(key)
            if data is None:
                return None
            try:
                return entry, read_header(data)
            except RecordError:
                return None

        found = await self._call(work)
        if found is None:
            return None
        entry, header = found
        return RecordInfo(
            request_id=request_id,
            num_tokens=int(header.get("num_tokens", 0)),
            num_prompt_tokens=int(header.get("num_prompt_tokens", 0)),
            nbytes=entry.nbytes,
            fingerprint=str(header.get("fingerprint", "")),
            created_at=float(header.get("created_at", 0.0)),
            last_used_at=entry.last_used_at,
            expires_at=entry.expires_at,
        )

    # -- per-request_id lease (one writer at a time, across replicas) ------------------------
    async def acquire(self, tenant: str, request_id: str) -> str | None:
        """Take the request_id's lease: a token on success, None when another request holds it.

        Raises BackendUnavailable when the store cannot answer.
        """
        token = uuid.uuid4().hex
        ok = await self._call(self.backend.acquire, "lease:" + self.key(tenant, request_id), token,
                              LEASE_SECONDS)
        return token if ok else None

    async def release(self, tenant: str, request_id: str, token: str) -> None:
        try:
            await self._call(self.backend.release, "lease:" + self.key(tenant, request_id), token)
        except BackendUnavailable:
            pass  # the lease lapses by itself

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.backend.close()

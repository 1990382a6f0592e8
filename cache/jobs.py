"""Background jobs in the store: a registry record, a lease, an event list and a cancel mark each.

Any replica can find a job (``list_jobs`` scans the registry), read its events from any index on
and cancel it; the replica that holds its lease runs it and is the only writer of its events:
``append_events`` (``append_many`` for all of a replica's jobs in one store call) is fenced by
each list's length, so a writer that lost the lease (a takeover
while it was paused) can never add an event twice or out of place.

Bounds: a job's events are at most one per generated token plus a fixed dozen, so a list is
bounded by the request's ``max_output_tokens``; every record here expires ``ttl`` seconds after
its last write (the event list after its last append), and a finished job's registry record is
deleted at once.
"""

from __future__ import annotations

import json
from typing import Any

from cache import keys
from cache.store import KVStore


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class JobStore:
    """Background-job records on a ``KVStore``'s backend (every method raises
    ``BackendUnavailable`` when the store cannot answer, unless it says otherwise)."""

    def __init__(self, store: KVStore, *, ttl: float, lease_seconds: float) -> None:
        self.store = store
        self.ttl = ttl or None
        self.lease_seconds = lease_seconds

    async def _call(self, fn, *args):
        return await self.store._call(fn, *args)

    # -- registry --------------------------------------------------------------------------
    async def put_job(self, tenant: str, job_id: str, job: dict[str, Any]) -> None:
        await self._call(self.store.backend.set, keys.job_key(tenant, job_id), _dumps(job), self.ttl)

    async def get_job(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        data = await self._call(self.store.backend.get, keys.job_key(tenant, job_id))
        if data is None:
            return None
        try:
            return json.loads(bytes(data))
        except ValueError:
            return None

    async def delete_job(self, tenant: str, job_id: str) -> None:
        await self._call(self.store.backend.delete, keys.job_key(tenant, job_id))

    async def list_jobs(self, limit: int = 1000) -> list[tuple[str, str]]:
        """(tenant, job id) of up to ``limit`` registered jobs, every tenant's."""
        out: list[tuple[str, str]] = []
        cursor = None
        while len(out) < limit:
            names, cursor = await self._call(self.store.backend.scan, keys.JOB_PREFIX, cursor, limit - len(out))
            out += [j for j in map(keys.job_of, names) if j is not None]
            if cursor is None:
                break
        return out

    # -- the runner's lease ----------------------------------------------------------------
    async def claim(self, tenant: str, job_id: str, token: str) -> bool:
        """Take the job's lease for ``token``; False when a live runner holds it."""
        return bool(await self._call(self.store.backend.acquire, keys.job_lease_key(tenant, job_id), token,
                                     self.lease_seconds))

    async def renew(self, tenant: str, job_id: str, token: str) -> bool:
        return bool(await self._call(self.store.backend.renew, keys.job_lease_key(tenant, job_id), token,
                                     self.lease_seconds))

    async def release(self, tenant: str, job_id: str, token: str) -> None:
        await self._call(self.store.backend.release, keys.job_lease_key(tenant, job_id), token)

    # -- events ----------------------------------------------------------------------------
    async def append_events(self, tenant: str, job_id: str, expected: int, items: list[dict[str, Any]]) -> bool:
        """Append ``items`` at index ``expected``; False (nothing written) when the list has
        another length: another runner wrote there."""
        n = await self._call(self.store.backend.log_append, keys.events_key(tenant, job_id), expected,
                             [_dumps(it) for it in items], self.ttl)
        return n >= 0

    async def append_many(self, appends: list[tuple[str, str, int, list[dict[str, Any]]]]) -> list[bool]:
        """``append_events(tenant, job_id, expected, items)`` of several jobs in one store call;
        for each, False (nothing written to that list) when it was refused."""
        if not appends:
            return []
        lists = [(keys.events_key(tenant, job_id), expected, [_dumps(it) for it in items])
                 for tenant, job_id, expected, items in appends]
        return [n >= 0 for n in await self._call(self.store.backend.log_append_many, lists, self.ttl)]

    async def read_events(self, tenant: str, job_id: str, start: int, count: int = 1000) -> list[dict[str, Any]]:
        """Up to ``count`` items from index ``start`` on (fewer at the list's end)."""
        datas = await self._call(self.store.backend.log_read, keys.events_key(tenant, job_id), start, count)
        return [json.loads(bytes(d)) for d in datas]

    async def read_all_events(self, tenant: str, job_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = await self.read_events(tenant, job_id, len(out))
            out += page
            if len(page) < 1000:
                return out

    # -- cancel ----------------------------------------------------------------------------
    async def mark_cancelled(self, tenant: str, job_id: str) -> None:
        await self._call(self.store.backend.set, keys.cancel_key(tenant, job_id), b"1", self.ttl)

    async def is_cancelled(self, tenant: str, job_id: str) -> bool:
        return (await self._call(self.store.backend.exists, [keys.cancel_key(tenant, job_id)]))[0]

    async def cancelled_among(self, jobs: list[tuple[str, str]]) -> list[bool]:
        """For each (tenant, job id), whether it is marked cancelled (one store call)."""
        if not jobs:
            return []
        return await self._call(self.store.backend.exists, [keys.cancel_key(t, j) for t, j in jobs])

    async def delete(self, tenant: str, job_id: str) -> None:
        """Forget the job: registry record, events and cancel mark."""
        await self._call(self.store.backend.delete, keys.job_key(tenant, job_id))
        await self._call(self.store.backend.log_delete, keys.events_key(tenant, job_id))
        await self._call(self.store.backend.delete, keys.cancel_key(tenant, job_id))

"""Leases on request_ids: requests on one request_id run one at a time, on any replica."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from cache.base import BackendUnavailable
from cache.store import KVStore
from session.errors import RequestBusy

log = logging.getLogger("kvbento.session")


class Lease:
    """A held request_id lease, renewed in the background until released (so it lapses within
    seconds of a crashed holder)."""

    def __init__(self, store: KVStore, tenant: str, request_id: str, token: str) -> None:
        self.store, self.tenant, self.request_id, self.token = store, tenant, request_id, token
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_seconds / 3)
            if not await self.store.renew(self.tenant, self.request_id, self.token):
                log.warning("lost the lease on a request_id while its request ran")
                return

    async def release(self) -> None:
        self._task.cancel()
        await self.store.release(self.tenant, self.request_id, self.token)


async def acquire(store: KVStore, tenant: str, request_id: str, wait_seconds: float) -> tuple[Lease | None, bool]:
    """The request_id's lease, waiting up to ``wait_seconds`` for another holder; (None, False)
    when the store is down.

    Raises:
        RequestBusy: another request still held it at the deadline.
    """
    deadline = time.monotonic() + wait_seconds
    delay = 0.005
    token = uuid.uuid4().hex
    while True:
        try:
            ok = await store.acquire(tenant, request_id, token)
        except BackendUnavailable:
            return None, False
        if ok:
            return Lease(store, tenant, request_id, token), True
        if time.monotonic() >= deadline:
            raise RequestBusy(f"request_id {request_id!r} is busy with another request", param="request_id")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)

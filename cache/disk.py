"""diskcache backend: the embedded default (``disk:///path``).

diskcache writes each large value to its own file and commits the row in SQLite only after the
file is complete, so a process killed mid-write leaves no readable entry. SQLite makes the
directory safe to share between processes (replicas on one host or a shared volume).
"""

from __future__ import annotations

import time

import diskcache

from cache.base import Backend, EntryInfo

_UNBOUNDED = 1 << 62


class DiskBackend(Backend):
    scheme = "disk"

    def __init__(self, directory: str, max_bytes: int = 0, timeout: float = 5.0) -> None:
        self._cache = diskcache.Cache(
            directory,
            size_limit=max_bytes or _UNBOUNDED,
            eviction_policy="least-recently-used",
            # Cull more than one entry per write so a big record makes room in one pass.
            cull_limit=64,
            timeout=timeout,
            disk_min_file_size=1 << 15,
        )
        self._max_bytes = max_bytes

    def get(self, key: str) -> bytes | None:
        value = self._cache.get(key, default=None, retry=True)
        return bytes(value) if value is not None and not isinstance(value, bytes) else value

    def set(self, key: str, value: bytes | bytearray | memoryview, ttl: float | None = None) -> None:
        # diskcache stores bytes raw in a file (no pickle); a bytearray would be pickled.
        data = value if isinstance(value, bytes) else bytes(value)
        self._cache.set(key, data, expire=ttl or None, retry=True)
        if self._max_bytes:
            # diskcache culls only on write and only down to its limit; keep the budget strict.
            while self._cache.volume() > self._max_bytes and self._cache.cull(retry=True):
                pass

    def delete(self, key: str) -> bool:
        return bool(self._cache.delete(key, retry=True))

    def info(self, key: str) -> EntryInfo | None:
        sql = "SELECT size, access_time, expire_time FROM Cache WHERE key = ? AND raw = 1"
        row = self._cache._sql(sql, (key,)).fetchone()  # diskcache keeps these per row
        if row is None:
            return None
        size, access_time, expire_time = row
        if expire_time is not None and expire_time < time.time():
            return None
        return EntryInfo(nbytes=int(size), last_used_at=access_time, expires_at=expire_time)

    def acquire(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._cache.add(key, token, expire=ttl, retry=True))

    def release(self, key: str, token: str) -> None:
        with self._cache.transact(retry=True):
            if self._cache.get(key) == token:
                self._cache.delete(key)

    def close(self) -> None:
        self._cache.close()

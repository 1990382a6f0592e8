"""diskcache backend: the embedded default (``disk:///path``).

diskcache writes each value to its own file and commits the row in SQLite only after the file is
complete, so a process killed mid-write leaves no readable entry. SQLite makes the directory safe
to share between processes (replicas on one host or a shared volume).

The byte budget is enforced here rather than by diskcache's ``size_limit``: diskcache counts its
SQLite pages against the limit and would cull lease rows like records. Here only record bytes
count, leases are never evicted, and the budget holds after every write.
"""

from __future__ import annotations

import io
import os
import time

import diskcache

from cache import keys, memory
from cache.base import HEAD_BYTES, Backend, EntryInfo

_UNBOUNDED = 1 << 62


class _Reader:
    """A file-like view of a buffer: diskcache streams it to the value file without a copy."""

    def __init__(self, value: bytes | bytearray | memoryview) -> None:
        self._mv = memoryview(value).cast("B")
        self._off = 0

    def read(self, size: int = -1) -> memoryview:
        end = len(self._mv) if size < 0 else min(len(self._mv), self._off + size)
        chunk = self._mv[self._off:end]
        self._off = end
        return chunk


class DiskBackend(Backend):
    scheme = "disk"

    def __init__(self, directory: str, max_bytes: int = 0, timeout: float = 5.0) -> None:
        self._cache = diskcache.Cache(
            directory,
            size_limit=_UNBOUNDED,  # see the module docstring: the budget is kept by _enforce_budget
            eviction_policy="least-recently-used",  # keeps access_time (and its index) up to date
            timeout=timeout,
        )
        self._max_bytes = max_bytes

    def get(self, key: str) -> bytes | memoryview | None:
        handle = self._cache.get(key, default=None, read=True, retry=True)
        if handle is None:
            return None
        if isinstance(handle, (bytes, bytearray)):  # a small value another writer stored inline
            return handle
        with handle:
            if isinstance(handle, io.BytesIO):  # a small value kept inside the database
                return handle.getvalue()
            # A record file: read into a pooled buffer; a fresh bytes object of tens of MB costs
            # more in first-touch page faults than the read itself (cache/memory.py).
            size = os.fstat(handle.fileno()).st_size
            buf = memory.read_buffers.take(size)
            got = 0
            while got < size:
                n = handle.readinto(buf[got:])
                if not n:
                    break
                got += n
            return buf[:got]

    def set(self, key: str, value: bytes | bytearray | memoryview, ttl: float | None = None) -> None:
        # read=True streams the buffer into the value file (raw bytes, no pickle, no copy).
        self._cache.set(key, _Reader(value), expire=ttl or None, read=True, retry=True)
        if self._max_bytes:
            self._enforce_budget()

    def _record_bytes(self) -> int:
        sql = ("SELECT COALESCE(SUM(CASE WHEN filename IS NULL THEN length(value) ELSE size END), 0) "
               "FROM Cache WHERE raw = 1 AND substr(key, 1, 6) != ? AND (expire_time IS NULL OR expire_time > ?)")
        return int(self._cache._sql(sql, (keys.LEASE, time.time())).fetchone()[0])

    def _enforce_budget(self) -> None:
        """Delete least recently used whole records until the records fit the budget."""
        self._cache.expire(retry=True)
        oldest = ("SELECT key FROM Cache WHERE raw = 1 AND substr(key, 1, 6) != ? "
                  "ORDER BY access_time LIMIT 1")
        for _ in range(100_000):  # bounded: each round deletes one record
            if self._record_bytes() <= self._max_bytes:
                return
            row = self._cache._sql(oldest, (keys.LEASE,)).fetchone()
            if row is None:
                return
            self._cache.delete(row[0], retry=True)  # a record bigger than the budget goes too

    def total_bytes(self) -> int:
        """Bytes of all live records (for tests and metrics)."""
        return self._record_bytes()

    def delete(self, key: str) -> bool:
        return bool(self._cache.delete(key, retry=True))

    def info(self, key: str) -> EntryInfo | None:
        # Read the row directly: Cache.get would count as a use and read the whole value.
        sql = ("SELECT size, access_time, expire_time, filename, value FROM Cache "
               "WHERE key = ? AND raw = 1")
        row = self._cache._sql(sql, (key,)).fetchone()
        if row is None:
            return None
        size, access_time, expire_time, filename, value = row
        if expire_time is not None and expire_time < time.time():
            return None
        if filename is not None:
            try:
                with open(os.path.join(self._cache.directory, filename), "rb") as f:
                    head = f.read(HEAD_BYTES)
            except FileNotFoundError:  # deleted or replaced since the row was read
                return None
        else:
            head = bytes(value)[:HEAD_BYTES] if isinstance(value, (bytes, memoryview)) else None
            size = len(value) if head is not None else size
        return EntryInfo(nbytes=int(size), last_used_at=access_time, expires_at=expire_time, head=head)

    def acquire(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._cache.add(key, token, expire=ttl, retry=True))

    def release(self, key: str, token: str) -> None:
        with self._cache.transact(retry=True):
            if self._cache.get(key) == token:
                self._cache.delete(key)

    def renew(self, key: str, token: str, ttl: float) -> bool:
        with self._cache.transact(retry=True):
            if self._cache.get(key) != token:
                return False
            return bool(self._cache.touch(key, expire=ttl))

    def exists(self, keys: list[str]) -> list[bool]:
        now = time.time()
        sql = "SELECT expire_time FROM Cache WHERE key = ? AND raw = 1"
        out = []
        for key in keys:
            row = self._cache._sql(sql, (key,)).fetchone()
            out.append(row is not None and (row[0] is None or row[0] > now))
        return out

    # A list is a length row under ``key`` (not raw: outside the byte budget) and one raw row
    # per item under ``key#<index>``, each expiring ``ttl`` after its own write (a reader stops at
    # the first missing one).
    def log_append(self, key: str, expected: int, values: list[bytes], ttl: float | None) -> int:
        return self.log_append_many([(key, expected, values)], ttl)[0]

    def log_append_many(self, appends: list[tuple[str, int, list[bytes]]], ttl: float | None) -> list[int]:
        out = []
        with self._cache.transact(retry=True):  # one SQLite transaction (one commit) for them all
            for key, expected, values in appends:
                n = self._cache.get(key, default=0, retry=True)
                if n != expected:
                    out.append(-1 - n)
                    continue
                for i, value in enumerate(values):
                    self._cache.set(f"{key}#{n + i:09d}", bytes(value), expire=ttl or None, retry=True)
                self._cache.set(key, n + len(values), expire=ttl or None, retry=True)
                out.append(n + len(values))
        return out

    def log_read(self, key: str, start: int, count: int) -> list[bytes]:
        n = self._cache.get(key, default=0, retry=True)
        out = []
        for i in range(start, min(n, start + count)):
            value = self._cache.get(f"{key}#{i:09d}", default=None, retry=True)
            if value is None:
                break  # expired under the reader: the list ends here
            out.append(bytes(value))
        return out

    def log_delete(self, key: str) -> None:
        with self._cache.transact(retry=True):
            n = self._cache.get(key, default=0, retry=True)
            for i in range(n):
                self._cache.delete(f"{key}#{i:09d}", retry=True)
            self._cache.delete(key, retry=True)

    def close(self) -> None:
        self._cache.close()

    def scan(self, prefix: str, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """Keys in key order; the cursor is the last key returned. SQL over the key index: no
        value is read, and expired rows are left out."""
        sql = ("SELECT key FROM Cache WHERE raw = 1 AND key >= ? AND key > ? AND substr(key, 1, ?) = ?"
               " AND (expire_time IS NULL OR expire_time > ?)")
        args: list = [prefix, cursor or "", len(prefix), prefix, time.time()]
        upper = _prefix_end(prefix)
        if upper is not None:  # bounds the index range; the substr test alone would scan to the end
            sql += " AND key < ?"
            args.append(upper)
        rows = self._cache._sql(sql + " ORDER BY key LIMIT ?", (*args, limit + 1)).fetchall()
        keys = [row[0] for row in rows[:limit] if isinstance(row[0], str)]
        return keys, (rows[limit - 1][0] if len(rows) > limit else None)


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (SQLite compares UTF-8
    bytes, which order as code points), or None when there is none to name."""
    for i in range(len(prefix) - 1, -1, -1):
        if ord(prefix[i]) < 0x10FFFF:
            nxt = ord(prefix[i]) + 1
            return prefix[:i] + chr(0xE000 if 0xD800 <= nxt < 0xE000 else nxt)  # no surrogates
    return None

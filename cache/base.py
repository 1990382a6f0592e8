"""The narrow bytes-level backend interface every KV store backend implements.

Backends are synchronous and blocking; ``cache.store.KVStore`` runs them on worker threads so no
store I/O ever runs on the event loop. A backend raises ``BackendUnavailable`` when it cannot
answer (connection refused, timeout), which the store turns into a cache miss marked
"unavailable" rather than an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


# How many leading bytes of a value ``Backend.info`` reads as ``EntryInfo.head``: more than any
# record header, never the tensors.
HEAD_BYTES = 64 << 10


class BackendUnavailable(RuntimeError):
    """The backend could not be reached or did not answer in time."""


@dataclass
class EntryInfo:
    """Backend-side facts about one stored value."""

    nbytes: int
    last_used_at: float | None = None
    expires_at: float | None = None
    # The value's first bytes (at least its record header when the backend can read a prefix
    # cheaply); None when the backend cannot, and the store then reads the whole value.
    head: bytes | None = None


class Backend(ABC):
    """Stores opaque byte values under string keys, each value written atomically.

    ``ttl`` is in seconds (``None`` = no expiry). Implementations own eviction within their byte
    budget, least recently used first.
    """

    scheme: str = ""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired. Counts as a use for LRU."""

    @abstractmethod
    def set(self, key: str, value: bytes | bytearray | memoryview, ttl: float | None = None) -> None:
        """Store ``value`` atomically: a reader sees the old value or the whole new one."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the key; True when it existed."""

    @abstractmethod
    def info(self, key: str) -> EntryInfo | None:
        """Size and usage facts (plus the value's head) without reading it all; None when absent.

        Does not count as a use for LRU.
        """

    @abstractmethod
    def acquire(self, key: str, token: str, ttl: float) -> bool:
        """Take the lease ``key`` for ``token`` unless someone holds it; it lapses after ``ttl``."""

    @abstractmethod
    def release(self, key: str, token: str) -> None:
        """Give the lease back, only if ``token`` still holds it."""

    @abstractmethod
    def renew(self, key: str, token: str, ttl: float) -> bool:
        """Extend the lease ``key`` to ``ttl`` from now if ``token`` still holds it; else False."""

    @abstractmethod
    def exists(self, keys: list[str]) -> list[bool]:
        """For each key, whether it holds a live value (not a use for LRU)."""

    def log_append(self, key: str, expected: int, values: list[bytes], ttl: float | None) -> int:
        """Append ``values`` to the list ``key`` only if it holds ``expected`` items (a writer that
        lost its place, e.g. to a takeover, is refused), and make the list expire ``ttl`` seconds
        from now. Returns the new length, or -1 - the current length when refused."""
        raise NotImplementedError

    def log_append_many(self, appends: list[tuple[str, int, list[bytes]]], ttl: float | None) -> list[int]:
        """``log_append(key, expected, values, ttl)`` of several lists, in one round trip where the
        backend can (a background runner writes all of its jobs' events at once). Each list is
        fenced on its own; the results come in the order of ``appends``."""
        return [self.log_append(key, expected, values, ttl) for key, expected, values in appends]

    def log_read(self, key: str, start: int, count: int) -> list[bytes]:
        """Up to ``count`` items of the list ``key`` from index ``start`` on ([] past its end or
        when it is absent)."""
        raise NotImplementedError

    def log_delete(self, key: str) -> None:
        """Remove the list ``key``."""
        self.delete(key)

    def scan(self, prefix: str, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to ``limit`` keys starting with ``prefix`` from ``cursor`` on, and the next cursor
        (None at the end). Values are not read."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and file handles."""

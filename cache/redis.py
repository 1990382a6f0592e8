"""Redis backend (``redis://[:password@]host:port/db``, ``rediss://`` for TLS): the shared store
that lets replicas continue each other's request_ids.

Each record is ONE Redis string, written by a single ``SET ... PX`` inside MULTI/EXEC together with
its accounting, so a reader sees the old record or the whole new one and eviction can never split
a record. The byte budget is kept by this backend, not by Redis' ``maxmemory``: an index per
namespace (``<ns>:index:lru`` sorted set key -> last use in µs, ``:size`` hash key -> bytes,
``:exp`` sorted set key -> expiry in µs, ``:total`` bytes) is updated by Lua scripts, which Redis
runs atomically, so concurrent replicas keep it consistent. Times come from the Redis server's
clock (``TIME``) so replicas with skewed clocks agree on "least recently used".

Not for Redis Cluster: the scripts touch record keys that are not declared in ``KEYS``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import redis
from redis._parsers import Encoder
from redis.backoff import NoBackoff
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from cache import memory
from cache.base import HEAD_BYTES, Backend, BackendUnavailable, EntryInfo

T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# Drop one key from the index (and Redis); KEYS = lru, size, exp, total.
_FORGET = """
local function forget(k)
  local s = tonumber(redis.call('HGET', KEYS[2], k) or '0')
  redis.call('HDEL', KEYS[2], k)
  redis.call('ZREM', KEYS[1], k)
  redis.call('ZREM', KEYS[3], k)
  if s ~= 0 then redis.call('DECRBY', KEYS[4], s) end
  return redis.call('DEL', k)
end
local function purge_expired(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 256)
  for _, k in ipairs(gone) do forget(k) end
end
"""

# After SET in the same MULTI: account ARGV = key, nbytes, ttl_ms (0 = none), max_bytes (0 = none).
# Evicts least recently used whole records while over budget; returns the number evicted.
_ACCOUNT = _NOW + _FORGET + """
local key, n, ttl, maxb = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
purge_expired(now)
local old = tonumber(redis.call('HGET', KEYS[2], key) or '0')
redis.call('HSET', KEYS[2], key, n)
redis.call('ZADD', KEYS[1], now, key)
if ttl > 0 then redis.call('ZADD', KEYS[3], now + ttl * 1000, key) else redis.call('ZREM', KEYS[3], key) end
local total = redis.call('INCRBY', KEYS[4], n - old)
local evicted = 0
while maxb > 0 and total > maxb do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest then break end
  forget(oldest)  -- a record bigger than the whole budget is not kept either
  evicted = evicted + 1
  total = tonumber(redis.call('GET', KEYS[4]) or '0')
end
return evicted
"""

# A read: mark ARGV[1] as used now (only when it still exists and is indexed).
_TOUCH = _NOW + """
if redis.call('EXISTS', ARGV[1]) == 1 then redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1]) end
return now
"""

_DELETE = _NOW + _FORGET + """
purge_expired(now)
return forget(ARGV[1])
"""

# The lease scripts: one lease, one key, so a Redis Cluster runs the same ones (cache/redis_cluster.py).
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Append-if-length (a fenced writer): KEYS[1] the list; ARGV = expected length, ttl_ms (0 = none),
# values... Returns the new length, or -1 - the current length when it is not the expected one.
LOG_APPEND = """
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[1]) then return -1 - n end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n + #ARGV - 2
"""


class BulkReader:
    """GET of large values straight into one huge-page buffer, for plain TCP Redis URLs.

    Through redis-py a bulk reply is copied three times (socket chunks, the parser's growing buffer,
    the final ``bytes``), each into memory nobody has touched yet, and first-touch page faults
    are most of a large load (bench/NOTES.md). This reader speaks just enough RESP2 for ``GET`` on a
    connection of its own per worker thread (``AUTH`` and ``SELECT`` as the URL says) and receives
    the value with ``recv_into``. TLS and unix-socket URLs keep redis-py's path.
    """

    def __init__(self, host: str, port: int, db: int, username: str | None, password: str | None,
                 timeout: float) -> None:
        self._addr = (host, port)
        self._db = int(db or 0)
        self._auth = [a for a in (username, password) if a] if password else []
        self._timeout = timeout
        self._local = threading.local()
        self.chunk_bytes = 4 << 20
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    @classmethod
    def for_client(cls, client: redis.Redis, timeout: float) -> "BulkReader | None":
        pool = client.connection_pool
        if pool.connection_class is not redis.connection.Connection:  # TLS, unix socket
            return None
        kw = pool.connection_kwargs
        return cls(kw.get("host", "localhost"), int(kw.get("port", 6379)), kw.get("db", 0),
                   kw.get("username"), kw.get("password"), timeout)

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._addr, timeout=min(self._timeout, 2.0))
        sock.settimeout(self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open.add(sock)
        self._local.sock = sock
        try:
            if self._auth:
                self._ok(sock, self._command("AUTH", *self._auth))
            if self._db:
                self._ok(sock, self._command("SELECT", str(self._db)))
        except BaseException:
            self._drop()
            raise
        return sock

    def _drop(self) -> None:
        sock = getattr(self._local, "sock", None)
        self._local.sock = None
        if sock is not None:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def close(self) -> None:
        with self._lock:
            socks, self._open = list(self._open), set()
        for sock in socks:
            sock.close()

    # -- RESP ------------------------------------------------------------------------------
    @staticmethod
    def _command(*args: str) -> bytes:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            parts += [f"${len(b)}\r\n".encode(), b, b"\r\n"]
        return b"".join(parts)

    @staticmethod
    def _line(sock: socket.socket, pending: bytearray) -> bytes:
        """The next CRLF-terminated line; bytes received after it stay in ``pending``."""
        for _ in range(1024):  # a header line is short: 1024 reads of 64 KiB is a broken peer
            i = pending.find(b"\r\n")
            if i >= 0:
                line = bytes(pending[:i])
                del pending[: i + 2]
                return line
            chunk = sock.recv(64 << 10)
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection")
            pending += chunk
        raise redis.ConnectionError("Redis sent no reply line")

    def _ok(self, sock: socket.socket, command: bytes) -> None:
        sock.sendall(command)
        pending = bytearray()
        line = self._line(sock, pending)
        if line.startswith(b"-"):
            raise redis.AuthenticationError(line[1:].decode(errors="replace"))
        if pending:
            raise redis.ConnectionError("unexpected data after a Redis reply")

    def get(self, key: str) -> memoryview | None:
        for attempt in (0, 1):
            reused = getattr(self._local, "sock", None) is not None
            try:
                sock = self._local.sock if reused else self._connect()
                return self._get(sock, key)
            except redis.ResponseError:
                raise  # the connection is in a clean state: the reply was read whole
            except (OSError, redis.ConnectionError) as exc:
                self._drop()
                if attempt or not reused:  # a pooled connection that died with a restart: once more
                    if isinstance(exc, redis.RedisError):
                        raise
                    raise redis.ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def _read_into(self, sock: socket.socket, pending: bytearray, dst: memoryview) -> None:
        got = min(len(pending), len(dst))
        dst[:got] = pending[:got]
        del pending[:got]
        while got < len(dst):
            r = sock.recv_into(dst[got:])
            if not r:
                raise redis.ConnectionError("Redis closed the connection mid-reply")
            got += r

    def _reply(self, sock: socket.socket, pending: bytearray, dst: memoryview | None = None) -> int | bytes:
        """One reply: an integer, or a bulk string (into ``dst``, whose size it must have, when
        given). An error reply raises ResponseError with the connection left clean."""
        line = self._line(sock, pending)
        if line.startswith(b"-"):
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        if line.startswith(b":") and line[1:].lstrip(b"-").isdigit():
            return int(line[1:])
        if not line.startswith(b"$") or not line[1:].isdigit():
            raise redis.ConnectionError(f"unexpected Redis reply: {line[:40]!r}")
        n = int(line[1:])
        if dst is None or n != len(dst):
            # Not the length asked for: the value changed between two ranges. Dropping the
            # connection is simpler than draining it; get() retries once on a new one.
            raise redis.ConnectionError("the value changed while it was read")
        self._read_into(sock, pending, dst)
        crlf = bytearray(2)
        self._read_into(sock, pending, memoryview(crlf))
        if crlf != b"\r\n":
            raise redis.ConnectionError("malformed Redis bulk reply")
        return n

    def _get(self, sock: socket.socket, key: str) -> memoryview | None:
        """STRLEN, then GETRANGE by chunks (two in flight) into one buffer.

        Not one GET: Redis 7 copies a whole large reply into a new buffer of its own before
        sending it, and that buffer's first-touch faults cost more than the transfer; the reply
        buffers of 4 MiB ranges are reused (bench/NOTES.md). A continuation
        reads while it holds the request_id's lease, so no save of that key runs meanwhile; a
        value replaced anyway (a save without the lease, a delete) fails the length check here
        or the record's checksum.
        """
        chunk = self.chunk_bytes
        rng = lambda lo: self._command("GETRANGE", key, str(lo), str(lo + chunk - 1))  # noqa: E731
        sock.sendall(self._command("STRLEN", key))
        pending = bytearray()
        n = self._reply(sock, pending)
        if not isinstance(n, int):
            raise redis.ConnectionError("unexpected Redis reply to STRLEN")
        if n == 0:
            return None  # no such key (a record is never empty)
        out = memory.read_buffers.take(n)
        starts = list(range(0, n, chunk))
        sock.sendall(b"".join(rng(lo) for lo in starts[:2]))
        for i, lo in enumerate(starts):
            if i + 2 < len(starts):
                sock.sendall(rng(starts[i + 2]))
            self._reply(sock, pending, out[lo : min(n, lo + chunk)])
        if pending:
            raise redis.ConnectionError("unexpected data after a Redis reply")
        return out


class RedisBackend(Backend):
    """A ``Backend`` on one Redis database; safe to share between any number of replicas."""

    scheme = "redis"

    def __init__(self, url: str, max_bytes: int = 0, timeout: float = 5.0, namespace: str = "kvbento") -> None:
        """Connect lazily to ``url``.

        Args:
            url: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` (TLS).
            max_bytes: byte budget over all records of ``namespace`` (0 = unbounded).
            timeout: socket timeout per command, so an outage fails fast instead of hanging.
            namespace: prefix of the index keys (deployments sharing one database need their own).
        """
        self._r = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 2.0),
            # One immediate retry: a pooled connection that died with a Redis restart is replaced
            # at once. No backoff: the store treats a failure as a miss, it must not wait.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
            # hiredis (when installed) parses replies fast but packs commands into one new bytes;
            # the Python packer sends a large value as its own chunk, i.e. without copying it.
            command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode),
        )
        self._max_bytes = max_bytes
        self._index = [f"{namespace}:index:{name}" for name in ("lru", "size", "exp", "total")]
        self._account = self._r.register_script(_ACCOUNT)
        self._touch = self._r.register_script(_TOUCH)
        self._delete = self._r.register_script(_DELETE)
        self._release = self._r.register_script(RELEASE_SCRIPT)
        self._renew = self._r.register_script(RENEW_SCRIPT)
        self._log_append = self._r.register_script(LOG_APPEND)
        self._bulk = BulkReader.for_client(self._r, timeout)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        # Any Redis failure (refused, timeout, OOM, read-only replica) means "no cache now".
        try:
            yield
        except redis.RedisError as exc:
            raise BackendUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    def _run(self, fn: Callable[[], T]) -> T:
        with self._guard():
            return fn()

    def get(self, key: str) -> bytes | memoryview | None:
        if self._bulk is not None:
            value = self._run(lambda: self._bulk.get(key))
            if value is not None:  # a use: only an existing, indexed key is marked
                self._run(lambda: self._touch(keys=self._index[:1], args=[key]))
            return value

        def work() -> bytes | None:
            pipe = self._r.pipeline(transaction=True)
            pipe.get(key)
            self._touch(keys=self._index[:1], args=[key], client=pipe)
            value, _ = pipe.execute()
            return value

        return self._run(work)

    def set(self, key: str, value: bytes | bytearray | memoryview, ttl: float | None = None) -> None:
        ttl_ms = int(ttl * 1000) if ttl else 0
        nbytes = memoryview(value).nbytes

        def work() -> None:
            pipe = self._r.pipeline(transaction=True)
            # redis-py sends bytes-like values as their own chunk: no copy of a large record.
            pipe.set(key, value, px=ttl_ms or None)
            self._account(keys=self._index, args=[key, nbytes, ttl_ms, self._max_bytes], client=pipe)
            pipe.execute()

        self._run(work)

    def delete(self, key: str) -> bool:
        return bool(self._run(lambda: self._delete(keys=self._index, args=[key])))

    def info(self, key: str) -> EntryInfo | None:
        def work() -> EntryInfo | None:
            pipe = self._r.pipeline(transaction=True)
            pipe.strlen(key)
            pipe.pttl(key)
            pipe.zscore(self._index[0], key)
            pipe.getrange(key, 0, HEAD_BYTES - 1)  # the header only, never the tensors
            nbytes, pttl, score, head = pipe.execute()
            if not nbytes:
                return None
            expires = time.time() + pttl / 1000 if pttl and pttl > 0 else None
            return EntryInfo(nbytes=int(nbytes), last_used_at=score / 1e6 if score else None,
                             expires_at=expires, head=head)

        return self._run(work)

    def acquire(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._run(lambda: self._r.set(key, token, nx=True, px=max(1, int(ttl * 1000)))))

    def release(self, key: str, token: str) -> None:
        self._run(lambda: self._release(keys=[key], args=[token]))

    def renew(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._run(lambda: self._renew(keys=[key], args=[token, max(1, int(ttl * 1000))])))

    def exists(self, keys: list[str]) -> list[bool]:
        def work() -> list[bool]:
            pipe = self._r.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(n) for n in pipe.execute()]

        return self._run(work) if keys else []

    def log_append(self, key: str, expected: int, values: list[bytes], ttl: float | None) -> int:
        # Lists stay out of the byte budget's index: they are bounded by count and expire by TTL.
        ttl_ms = max(1, int(ttl * 1000)) if ttl else 0
        return int(self._run(lambda: self._log_append(keys=[key], args=[expected, ttl_ms, *values])))

    def log_append_many(self, appends: list[tuple[str, int, list[bytes]]], ttl: float | None) -> list[int]:
        ttl_ms = max(1, int(ttl * 1000)) if ttl else 0

        def work() -> list[int]:
            pipe = self._r.pipeline(transaction=False)  # one round trip; each script fences its list
            for key, expected, values in appends:
                self._log_append(keys=[key], args=[expected, ttl_ms, *values], client=pipe)
            return [int(n) for n in pipe.execute()]

        return self._run(work) if appends else []

    def log_read(self, key: str, start: int, count: int) -> list[bytes]:
        return self._run(lambda: self._r.lrange(key, start, start + count - 1))

    def total_bytes(self) -> int:
        """Bytes of all records in the budget's account (for tests and metrics)."""
        return int(self._run(lambda: self._r.get(self._index[3])) or 0)

    def close(self) -> None:
        if self._bulk is not None:
            self._bulk.close()
        self._r.close()

    def scan(self, prefix: str, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """SCAN MATCH over the keyspace; the cursor is Redis' own. A scan step is never split, so
        a page can hold the few keys of its last step beyond ``limit``, and Redis may repeat a key
        across pages (SCAN's guarantee: every key present throughout is returned at least once)."""
        try:
            at = int(cursor) if cursor else 0
        except ValueError:
            raise ValueError(f"not a Redis scan cursor: {cursor!r}") from None
        match = glob_escape(prefix) + "*"

        def work() -> tuple[list[str], str | None]:
            keys: list[str] = []
            nonlocal at
            while True:
                # COUNT bounds the keys a step visits, and so the keys it can add beyond ``limit``.
                at, batch = self._r.scan(at, match=match, count=limit - len(keys))
                keys += [k.decode() if isinstance(k, bytes) else k for k in batch]
                if at == 0 or len(keys) >= limit:
                    return keys, (str(at) if at else None)

        return self._run(work)


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

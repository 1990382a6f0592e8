"""Redis Cluster backend (``redis+cluster://[[user]:password@]host:port[,host:port…][/?ssl=true]``).

The node list only seeds discovery: redis-py's cluster client learns the slot map from any node
that answers and follows MOVED/ASK redirects and failovers itself. Keys carry hash tags
(``cache/keys.py``), and every command or script here touches one key, so nothing crosses slots.

Budget and TTL on a cluster, by design:

- TTL: every value is written with one ``SET ... PX`` (atomic per key), so Redis expires it on
  whichever node owns its slot.
- Byte budget: not kept by kvbento. A budget index would have to live in one slot while the
  values spread over all of them, and a script cannot touch both. Each node's own ``maxmemory``
  with ``maxmemory-policy allkeys-lru`` bounds it instead (budget = the nodes' maxmemory summed),
  and Redis evicts whole keys. A lost block or head is a partial or complete miss, never wrong
  output: the store checks what it reads and treats absent or damaged values as misses.
  ``KVBENTO_CACHE_MAX_BYTES`` is refused with this scheme rather than ignored.
- Leases are plain keys too, so under memory pressure LRU may evict one early; they are small and
  recently used, and a lost lease costs at most a duplicate save of the same request_id.
- ``info()`` reads a value's length and head, which Redis counts as an access for its LRU.
- One Redis master down: its slots answer nothing until it (or a promoted replica) returns; the
  client fails fast there (one retry, no backoff) and other slots keep working, provided the
  nodes run with ``cluster-require-full-coverage no``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from cache.base import HEAD_BYTES, Backend, BackendUnavailable, EntryInfo
from cache.redis import LOG_APPEND, RELEASE_SCRIPT, RENEW_SCRIPT, BulkReader, glob_escape

T = TypeVar("T")
SCHEME = "redis+cluster"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}



def parse_url(url: str) -> dict:
    """The client options of a ``redis+cluster://`` URL.

    Returns:
        ``{"startup_nodes": [ClusterNode, ...], "username", "password", "ssl"}``.

    Raises:
        ValueError: another scheme, no node, a node without a valid port, a database other than
            0, or an unknown option.
    """
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"not a {SCHEME}:// URL: {url!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for item in filter(None, hosts.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{SCHEME} URL node {item!r} needs host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"{SCHEME} URL needs at least one host:port: {url!r}")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{SCHEME} URL: a cluster has only database 0, not {parts.path!r}")
    ssl = False
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name != "ssl" or values[-1].lower() not in _TRUE | _FALSE:
            raise ValueError(f"{SCHEME} URL option {name}={values[-1]!r} is not known (only ssl=true|false)")
        ssl = values[-1].lower() in _TRUE
    return {"startup_nodes": nodes, "username": unquote(username) or None,
            "password": unquote(password) or None, "ssl": ssl}


class RedisClusterBackend(Backend):
    """A ``Backend`` on a Redis Cluster; any number of replicas may share it."""

    scheme = SCHEME

    def __init__(self, url: str, max_bytes: int = 0, timeout: float = 5.0) -> None:
        """Check ``url``; the cluster is contacted on first use, so a server starts while it is down.

        Args:
            url: ``redis+cluster://[[user]:password@]host:port[,host:port…][/?ssl=true]``.
            max_bytes: must be 0: each node's maxmemory + allkeys-lru is the budget (module doc).
            timeout: socket timeout per command, so a dead node fails fast instead of hanging.

        Raises:
            ValueError: a malformed URL, or a byte budget.
        """
        if max_bytes:
            raise ValueError(
                "KVBENTO_CACHE_MAX_BYTES is not supported with redis+cluster://: set maxmemory and "
                "maxmemory-policy allkeys-lru on each cluster node instead (0 here)")
        self._options = parse_url(url)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._r: RedisCluster | None = None
        # Per primary, values are read by the bulk reader into pooled buffers (cache/redis.py);
        # redis-py returns each one as fresh bytes, whose page faults cost more than the transfer.
        self._readers: dict[str, BulkReader] | None = None if self._options["ssl"] else {}

    # -- connection ----------------------------------------------------------------------------
    def _client(self) -> RedisCluster:
        r = self._r
        if r is not None:
            return r
        with self._lock:
            if self._r is None:
                self._r = RedisCluster(
                    **self._options,
                    socket_timeout=self._timeout,
                    socket_connect_timeout=min(self._timeout, 2.0),
                    # A dead master's slots fail fast (the store turns that into a miss) while the
                    # other slots keep answering; the client refreshes its slot map on the error.
                    require_full_coverage=False,
                    retry=Retry(NoBackoff(), 1),
                )
                self._release = self._r.register_script(RELEASE_SCRIPT)
                self._renew = self._r.register_script(RENEW_SCRIPT)
                self._log_append = self._r.register_script(LOG_APPEND)
            return self._r

    @contextmanager
    def _guard(self) -> Iterator[None]:
        # Refused, timed out, cluster down, slot not covered, OOM: all mean "no cache now".
        try:
            yield
        except (redis.RedisError, RedisClusterException) as exc:
            raise BackendUnavailable(f"redis cluster: {type(exc).__name__}: {exc}") from exc

    def _run(self, fn: Callable[[RedisCluster], T]) -> T:
        with self._guard():
            return fn(self._client())

    # -- values ------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | memoryview | None:
        if self._readers is None:
            return self._run(lambda r: r.get(key))

        def work(r: RedisCluster) -> bytes | memoryview | None:
            node = r.get_node_from_key(key)
            reader = self._readers.get(node.name)
            if reader is None:
                with self._lock:
                    reader = self._readers.setdefault(node.name, BulkReader(
                        node.host, node.port, 0, self._options["username"], self._options["password"],
                        self._timeout))
            try:
                return reader.get(key)
            except redis.ResponseError as exc:
                if not str(exc).startswith(("MOVED", "ASK")):
                    raise
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass
            # A slot that moved or a node that failed: redis-py follows redirects and failovers
            # and refreshes its slot map, which the next bulk read then goes by.
            return r.get(key)

        return self._run(work)

    def set(self, key: str, value: bytes | bytearray | memoryview, ttl: float | None = None) -> None:
        ttl_ms = max(1, int(ttl * 1000)) if ttl else None
        self._run(lambda r: r.set(key, value, px=ttl_ms))

    def delete(self, key: str) -> bool:
        return bool(self._run(lambda r: r.delete(key)))

    def info(self, key: str) -> EntryInfo | None:
        def work(r: RedisCluster) -> EntryInfo | None:
            pipe = r.pipeline(transaction=False)  # one key: one node, one round trip
            pipe.object("idletime", key)  # before the reads below, which count as a use
            pipe.strlen(key)
            pipe.pttl(key)
            pipe.getrange(key, 0, HEAD_BYTES - 1)
            idle, nbytes, pttl, head = pipe.execute(raise_on_error=False)
            if isinstance(nbytes, Exception):
                raise nbytes
            if not nbytes:
                return None
            now = time.time()
            return EntryInfo(
                nbytes=int(nbytes),
                # OBJECT IDLETIME fails under an LFU policy: no last use then.
                last_used_at=now - idle if isinstance(idle, int) else None,
                expires_at=now + pttl / 1000 if isinstance(pttl, int) and pttl > 0 else None,
                head=head if isinstance(head, bytes) else None,
            )

        return self._run(work)

    def exists(self, keys: list[str]) -> list[bool]:
        def work(r: RedisCluster) -> list[bool]:
            pipe = r.pipeline(transaction=False)  # keys of many slots: grouped by node
            for key in keys:
                pipe.exists(key)
            return [bool(n) for n in pipe.execute()]

        return self._run(work) if keys else []

    # -- leases --------------------------------------------------------------------------------
    def acquire(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._run(lambda r: r.set(key, token, nx=True, px=max(1, int(ttl * 1000)))))

    def release(self, key: str, token: str) -> None:
        self._run(lambda r: self._release(keys=[key], args=[token]))

    def renew(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._run(lambda r: self._renew(keys=[key], args=[token, max(1, int(ttl * 1000))])))

    # -- lists (one key: one slot, so the script runs on its node) ------------------------------
    def log_append(self, key: str, expected: int, values: list[bytes], ttl: float | None) -> int:
        ttl_ms = max(1, int(ttl * 1000)) if ttl else 0
        return int(self._run(lambda r: self._log_append(keys=[key], args=[expected, ttl_ms, *values])))

    def log_append_many(self, appends: list[tuple[str, int, list[bytes]]], ttl: float | None) -> list[int]:
        ttl_ms = max(1, int(ttl * 1000)) if ttl else 0

        def work(r: RedisCluster) -> list[int]:
            # Grouped by node, one round trip each; a list is one key, so its script runs on its node
            # (EVAL: a cluster pipeline cannot load a script on each node first).
            pipe = r.pipeline(transaction=False)
            for key, expected, values in appends:
                pipe.execute_command("EVAL", LOG_APPEND, 1, key, expected, ttl_ms, *values)
            return [int(n) for n in pipe.execute()]

        return self._run(work) if appends else []

    def log_read(self, key: str, start: int, count: int) -> list[bytes]:
        return self._run(lambda r: r.lrange(key, start, start + count - 1))

    # -- scan ----------------------------------------------------------------------------------
    def scan(self, prefix: str, cursor: str | None, limit: int) -> tuple[list[str], str | None]:
        """Keys of every primary, one primary after the other in the order of their names.

        The cursor is ``<node name>|<node's SCAN cursor>|<keys of that SCAN step already
        returned>``, so a page ends after exactly ``limit`` keys even inside one SCAN reply.
        Like SCAN, a key present for the whole scan is returned (a failover or resharding
        meanwhile can return some keys twice); keys added or removed meanwhile may or may not be.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        pattern = glob_escape(prefix) + "*"

        def work(r: RedisCluster) -> tuple[list[str], str | None]:
            names = sorted(n.name for n in r.get_primaries())
            name, node_cursor, skip = names[0] if names else "", 0, 0
            if cursor:
                name, node_cursor_s, skip_s = cursor.rsplit("|", 2)
                node_cursor, skip = int(node_cursor_s), int(skip_s)
            out: list[str] = []
            while names:
                if name not in names:  # that primary left: go on with the next one by name
                    later = [n for n in names if n > name]
                    if not later:
                        return out, None
                    name, node_cursor, skip = later[0], 0, 0
                node = r.get_redis_connection(r.get_node(node_name=name))  # that node's own client
                nxt, keys = node.scan(node_cursor, match=pattern, count=max(limit, 100))
                keys = [k.decode() if isinstance(k, bytes) else k for k in keys][skip:]
                room = limit - len(out)
                if len(keys) > room:
                    out += keys[:room]
                    return out, f"{name}|{node_cursor}|{skip + room}"
                out += keys
                if int(nxt) != 0:
                    node_cursor, skip = int(nxt), 0
                else:
                    later = [n for n in names if n > name]
                    if not later:
                        return out, None
                    name, node_cursor, skip = later[0], 0, 0
                if len(out) == limit:
                    return out, f"{name}|{node_cursor}|{skip}"
            return out, None

        return self._run(work)

    def close(self) -> None:
        with self._lock:
            for reader in (self._readers or {}).values():
                reader.close()
            if self._readers:
                self._readers = {}
            if self._r is not None:
                self._r.close()
                self._r = None

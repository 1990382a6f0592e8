"""URL-scheme factory: ``disk:///path``, ``redis://host:port/db`` (``rediss://`` for TLS) or
``redis+cluster://host:port[,host:port…]``."""

from __future__ import annotations

from urllib.parse import urlparse

from cache.base import Backend


def open_backend(url: str, *, max_bytes: int = 0, timeout: float = 5.0) -> Backend:
    """Open the backend named by ``url``.

    Raises:
        ValueError: unknown scheme or a URL without a path/host.
    """
    parsed = urlparse(url)
    match parsed.scheme:
        case "disk":
            path = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
            if not path:
                raise ValueError(f"disk cache URL needs a directory: {url!r}")
            from cache.disk import DiskBackend

            return DiskBackend(path, max_bytes=max_bytes, timeout=timeout)
        case "redis" | "rediss":
            from cache.redis import RedisBackend

            return RedisBackend(url, max_bytes=max_bytes, timeout=timeout)
        case "redis+cluster":
            from cache.redis_cluster import RedisClusterBackend

            return RedisClusterBackend(url, max_bytes=max_bytes, timeout=timeout)
        case _:
            raise ValueError(f"unknown cache URL scheme {parsed.scheme!r} "
                             "(use disk://, redis:// or redis+cluster://)")

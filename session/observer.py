"""Hooks for the session's store events (metrics); the default does nothing. Called on the event
loop thread. The engine's own events go to ``model.engine.EngineObserver``."""

from __future__ import annotations

from cache.entries import CacheStatus


class SessionObserver:
    def on_cache(self, status: CacheStatus, seconds: float, nbytes: int) -> None:
        """A request's store lookup: its status, and the time and bytes its reads took."""

    def on_store_write(self, seconds: float, nbytes: int, ok: bool) -> None:
        """A finished request's save (``ok`` False: the store was down and the write was lost)."""

    def on_reuse(self, source: str, tokens: int) -> None:
        """KV reused for a request: source "local" (this process's memory) or "store" (read back)."""

    def on_prefix(self, found_by: str) -> None:
        """Where a restored prefix was found: "head", "anchor" or "blocks"."""

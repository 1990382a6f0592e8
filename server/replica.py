"""Which replica answered: ``X-KV-Replica`` on every answer of the app.

A load balancer that hashes ``X-KV-Request-Id`` sends a conversation's turns to one replica, whose
memory still holds its latest KV; this header lets clients and tests see that it did.
"""

from __future__ import annotations

import hashlib
import os
import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-kv-replica"


def replica_id(configured: str = "") -> str:
    """``configured`` (KVBENTO_REPLICA_ID) when set, else a hash of host name and process id:
    stable for the life of the process, new after a restart (whose memory starts empty)."""
    if configured:
        return configured
    return hashlib.sha256(f"{socket.gethostname()}/{os.getpid()}".encode()).hexdigest()[:12]


class ReplicaHeader:
    """ASGI middleware adding ``X-KV-Replica`` to every response, streams and errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._value: tuple[int, bytes] | None = None  # (pid, id): computed in the serving process

    def _id(self) -> bytes:
        if self._value is None or self._value[0] != os.getpid():
            from config import get_settings

            self._value = (os.getpid(), replica_id(get_settings().replica_id).encode())
        return self._value[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = self._id()

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, value)]
            await send(message)

        await self.app(scope, receive, send_with_replica)

"""A tenant's request_ids, page by page, answered from the store's key index and record headers.

Only each head's first bytes are read (``Backend.info``), never its tensors, so listing costs the
same whatever the records hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache import keys
from cache.base import Backend
from cache.codec import RecordError, read_header


@dataclass
class HeadSummary:
    request_id: str
    num_tokens: int | None
    nbytes: int
    created_at: float | None
    last_used_at: float | None
    expires_at: float | None


def list_heads_sync(backend: Backend, tenant: str, prefix: str, limit: int,
                    cursor: str | None) -> tuple[list[HeadSummary], str | None]:
    """Up to ``limit`` request_ids of ``tenant`` that start with ``prefix`` (blocking).

    Args:
        cursor: the ``next_cursor`` of the previous page, None for the first.
    Returns:
        The page, and the cursor of the next one (None after the last page).
    Raises:
        ValueError: ``cursor`` is not one this backend made.
        BackendUnavailable: the store cannot answer.
    """
    found, next_cursor = backend.scan(keys.head_key_prefix(tenant) + prefix, cursor, limit)
    page = []
    for key in found:
        request_id = keys.request_id_of(tenant, key)
        if request_id is None or not request_id.startswith(prefix):
            continue  # another kind of key under the same prefix
        entry = backend.info(key)
        if entry is None:
            continue  # deleted or expired since the scan
        header: dict = {}
        if entry.head is not None:
            try:
                header = read_header(entry.head)
            except RecordError:
                pass  # not a record, or a header longer than the head: sizes only
        tokens = header.get("num_tokens")
        created = header.get("created_at")
        page.append(HeadSummary(
            request_id=request_id,
            num_tokens=int(tokens) if isinstance(tokens, int) else None,
            nbytes=entry.nbytes,
            created_at=float(created) if isinstance(created, (int, float)) else None,
            last_used_at=entry.last_used_at,
            expires_at=entry.expires_at,
        ))
    return page, next_cursor


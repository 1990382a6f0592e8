"""A tenant's request_ids, page by page, answered from the store's key index and record headers.

Only each head's first bytes are read (``Backend.info``), never its tensors, so listing costs the
same whatever the records hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache import keys
from cache.base import Backend, EntryInfo
from cache.codec import RecordError, element_size, read_header


@dataclass
class HeadSummary:
    request_id: str
    num_tokens: int | None
    nbytes: int  # everything the record holds: see record_nbytes
    head_nbytes: int
    num_blocks: int
    created_at: float | None
    last_used_at: float | None
    expires_at: float | None


def read_head(backend: Backend, key: str) -> tuple[EntryInfo, dict | None] | None:
    """A head's size facts and its header (None when the value is not a record); the whole value is
    read only when the header is longer than the part ``Backend.info`` returns. None when absent."""
    entry = backend.info(key)
    if entry is None:
        return None
    data = entry.head
    for attempt in range(2):
        if data is not None:
            try:
                return entry, read_header(data)
            except RecordError:
                pass
        if attempt == 0:
            data = backend.get(key)
            if data is None:
                return None
    return entry, None


def record_nbytes(header: dict | None, head_nbytes: int, block_tokens: int) -> int:
    """Everything a request_id's record holds: its head plus the KV of every block it names (a
    block shared with other records is counted in full, as deleting the others would leave it)."""
    if not header:
        return head_nbytes
    blocks = (header.get("meta") or {}).get("blocks") or []
    esize = element_size(header.get("dtype"))
    per_position = sum(k[0] * k[2] + v[0] * v[2] for k, v in header.get("shapes") or []) * esize
    return head_nbytes + per_position * block_tokens * len(blocks)


def list_heads_sync(backend: Backend, tenant: str, prefix: str, limit: int,
                    cursor: str | None, block_tokens: int) -> tuple[list[HeadSummary], str | None]:
    """Up to ``limit`` request_ids of ``tenant`` that start with ``prefix`` (blocking).

    Args:
        cursor: the ``next_cursor`` of the previous page, None for the first.
        block_tokens: the store's positions per block, for each record's bytes.
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
        head = read_head(backend, key)
        if head is None:
            continue  # deleted or expired since the scan
        entry, header = head
        header = header or {}
        tokens = header.get("num_tokens")
        created = header.get("created_at")
        page.append(HeadSummary(
            request_id=request_id,
            num_tokens=int(tokens) if isinstance(tokens, int) else None,
            nbytes=record_nbytes(header, entry.nbytes, block_tokens),
            head_nbytes=entry.nbytes,
            num_blocks=len((header.get("meta") or {}).get("blocks") or []),
            created_at=float(created) if isinstance(created, (int, float)) else None,
            last_used_at=entry.last_used_at,
            expires_at=entry.expires_at,
        ))
    return page, next_cursor


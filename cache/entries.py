"""What the store hands out and takes: a lookup's status, blocks, heads, results of reads and
saves, a record as the API lists it; and the hash chain that names blocks (the engine's pool uses
the same names)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from enum import Enum

import torch


class CacheStatus(str, Enum):
    HIT = "hit"
    PARTIAL = "partial"
    MISS = "miss"
    UNAVAILABLE = "unavailable"


@dataclass
class Block:
    """One block's KV: per layer ``[kv_heads, block_tokens, head_dim]``."""

    hash: str
    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class Head:
    """A stored sequence: its tokens, the hashes of its full blocks, the KV of its tail."""

    token_ids: list[int]
    num_prompt_tokens: int
    blocks: list[str]
    tail_keys: list[torch.Tensor]
    tail_values: list[torch.Tensor]
    created_at: float = field(default_factory=time.time)
    nbytes: int = 0


@dataclass
class HeadResult:
    status: CacheStatus  # HIT (found), MISS or UNAVAILABLE
    head: Head | None = None
    nbytes: int = 0
    seconds: float = 0.0


@dataclass
class SaveResult:
    ok: bool
    nbytes: int = 0  # bytes written (blocks + heads)
    num_blocks: int = 0  # blocks written (new ones only)
    seconds: float = 0.0


@dataclass
class RecordInfo:
    request_id: str
    num_tokens: int
    num_prompt_tokens: int
    nbytes: int  # everything the record holds: cache.listing.record_nbytes
    head_nbytes: int
    num_blocks: int
    fingerprint: str
    created_at: float
    last_used_at: float | None
    expires_at: float | None


def tenant_of(api_key: str | None) -> str:
    """A stable, non-reversible tenant id for an API key ("public" without auth)."""
    if not api_key:
        return "public"
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def chain_hashes(fingerprint: str, tenant: str, token_ids: list[int], block_tokens: int,
                 num_blocks: int, start: list[str] | None = None) -> list[str]:
    """Hashes of the first ``num_blocks`` full blocks of ``token_ids``.

    ``start`` (hashes already known for the first blocks) is extended rather than recomputed.
    """
    out = list(start or [])[:num_blocks]
    parent = out[-1] if out else ""
    for i in range(len(out), num_blocks):
        chunk = token_ids[i * block_tokens:(i + 1) * block_tokens]
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{fingerprint}\0{tenant}\0{parent}\0".encode())
        h.update(torch.tensor(chunk, dtype=torch.int32).numpy().tobytes())
        parent = h.hexdigest()
        out.append(parent)
    return out

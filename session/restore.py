"""Finding and reading the longest stored prefix of a planned request's token ids.

A prefix is found three ways: the head the request extends (its own request_id's, or a fork
parent's) gives token-exact reuse of its whole sequence; an anonymous request looks for the
*anchor* the previous turn left at its prompt's end; and every request reuses the
content-addressed blocks of its prefix. The head's coverage and the blocks' are combined: full
blocks are read from the store, and a last partial block is a slice of a stored block or of the
head's tail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache.entries import CacheStatus, Head
from cache.store import KVStore
from session.alignment import Aligner, common_prefix
from session.request import GenerateRequest

if TYPE_CHECKING:
    from session.planning import Plan

# (request, block hashes) -> how many of the leading blocks the engine's pool holds.
Pooled = Callable[[GenerateRequest, list[str]], int]


@dataclass
class _Read:
    chunks: list  # the KV of positions [plan.prefix_from, num_cached), block by block
    num_cached: int
    num_local_blocks: int  # of the blocks read, how many came from this process's memory


async def restore_prefix(store: KVStore, aligner: Aligner, req: GenerateRequest, plan: "Plan",
                         text: str | None, pooled: Pooled | None = None) -> None:
    """Fill ``plan`` with the longest stored prefix of ``plan.token_ids`` (at most all but the
    last token, whose logits start generation) and the lookup's status. The leading blocks the
    engine's pool holds (``pooled``) are not read: the engine takes references to them.

    Raises:
        BackendUnavailable: the store cannot answer.
    """
    block = store.block_tokens
    head = plan.head
    if head is None and not req.named:
        head = await _find_anchor(store, aligner, req, plan, text)
    limit = len(plan.token_ids) - 1
    on_head = 0  # positions the head's own sequence covers
    if head is not None:
        on_head = min(common_prefix(plan.token_ids, head.token_ids), len(head.token_ids) - 1, limit)
    head_blocks = head.blocks[: on_head // block] if head is not None else []
    hashes = store.hashes(req.tenant, plan.token_ids, limit // block, head_blocks)
    num_stored = len(head_blocks) + await store.count_blocks(req.tenant, hashes[len(head_blocks):])
    restorable = max(on_head, num_stored * block)
    skip = pooled(req, hashes[: restorable // block]) if pooled is not None else 0
    read = await _read_prefix(store, req.tenant, plan, hashes, restorable, head, on_head, skip)
    num_cached = read.num_cached
    plan.num_cached = num_cached
    plan.chunks = read.chunks if num_cached else []
    plan.known_blocks = hashes[: num_cached // block]
    plan.local_tokens = min(read.num_local_blocks, restorable // block) * block
    own_head = head is not None and head is plan.head
    plan.status = _status(num_cached, limit, head.token_ids if own_head else None)
    if head is not None and 0 < num_cached <= on_head:  # the head's own sequence covers what was restored
        plan.found_by = "head" if head is plan.head else "anchor"
    plan.head = head  # an anchor, when one was found: the sequence this one extends


async def _find_anchor(store: KVStore, aligner: Aligner, req: GenerateRequest, plan: "Plan",
                       text: str | None) -> Head | None:
    """For an anonymous request: the anchor head the previous turn left at the end of the stored
    blocks of this prompt, when it covers more than those blocks. The client sent that turn's answer
    back as text, so the plan's tokens become the text aligned to the anchor's own ids."""
    block = store.block_tokens
    hashes = store.hashes(req.tenant, plan.token_ids, (len(plan.token_ids) - 1) // block)
    num_blocks = await store.count_blocks(req.tenant, hashes)
    anchor = await store.load_anchor(req.tenant, hashes[:num_blocks])
    if anchor is None:
        return None
    ids = aligner.align(text, anchor.token_ids, req.special_tokens)[0] if text is not None else plan.token_ids
    if min(common_prefix(ids, anchor.token_ids), len(anchor.token_ids) - 1) <= num_blocks * block:
        return None
    plan.token_ids = ids
    plan.num_prompt_tokens = len(ids)
    return anchor


async def _read_prefix(store: KVStore, tenant: str, plan: "Plan", hashes: list[str], restorable: int,
                       head: Head | None, on_head: int, skip: int) -> _Read:
    """Read the first ``restorable`` positions but the ``skip`` blocks in the engine's pool: the
    full blocks, then a partial last block sliced from the head's next stored block or its tail.
    What cannot be read shortens the prefix to the blocks that were."""
    block = store.block_tokens
    num_full = restorable // block
    partial = restorable - num_full * block
    partial_on_head = head is not None and partial and restorable <= on_head
    in_stored_block = partial_on_head and num_full < len(head.blocks)
    to_read = hashes[: num_full + 1] if in_stored_block else hashes[:num_full]
    blocks, nbytes, num_local = await store.read_blocks(tenant, to_read[skip:], plan.token_ids[skip * block:])
    blocks = [None] * skip + blocks
    num_local += skip
    plan.prefix_from = skip * block
    plan.read_bytes += nbytes
    chunks = [(blk.keys, blk.values) for blk in blocks[skip:num_full]]
    if len(blocks) < num_full:
        return _Read(chunks, len(blocks) * block, num_local)
    if not partial:
        return _Read(chunks, restorable, num_local)
    if not partial_on_head or (in_stored_block and len(blocks) <= num_full):
        return _Read(chunks, num_full * block, num_local)
    if in_stored_block:
        keys, values = blocks[num_full].keys, blocks[num_full].values
    else:
        keys, values = head.tail_keys, head.tail_values
    chunks.append(([k[:, :partial] for k in keys], [v[:, :partial] for v in values]))
    return _Read(chunks, restorable, num_local)


def _status(num_cached: int, limit: int, stored: list[int] | None) -> CacheStatus:
    """HIT: all that could be restored was (the whole prompt but its last token, or the whole of
    the request_id's own stored sequence); PARTIAL: some; MISS: none."""
    if num_cached == 0:
        return CacheStatus.MISS
    if num_cached >= limit or (stored is not None and num_cached >= len(stored) - 1):
        return CacheStatus.HIT
    return CacheStatus.PARTIAL

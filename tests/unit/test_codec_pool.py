"""The pooled encoder writes exactly what ``encode`` writes, and reused buffers never leak old bytes."""

from __future__ import annotations

import torch

from cache.codec import KVRecord, decode, encode, encoded


def _record(num_tokens: int, seed: int) -> KVRecord:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(2, num_tokens - 1, 4, generator=g) for _ in range(3)]
    values = [torch.randn(2, num_tokens - 1, 4, generator=g) for _ in range(3)]
    return KVRecord(list(range(num_tokens)), 1, "fp", keys, values, created_at=1.0)


def test_pooled_encode_matches_encode_and_reuses_without_leaking() -> None:
    big, small = _record(50, 0), _record(7, 1)
    with encoded(big) as view:
        assert bytes(view) == bytes(encode(big))
    # The big record's buffer is reused for the small one: the view must be exactly the small record.
    with encoded(small) as view:
        data = bytes(view)
    assert data == bytes(encode(small))
    back = decode(data)
    assert back.token_ids == small.token_ids
    assert all(torch.equal(a, b) for a, b in zip(back.values, small.values))

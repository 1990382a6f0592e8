import pytest
import torch

from cache.codec import KVRecord, RecordError, decode, encode, read_header


def make_record(n=9, layers=3, heads=2, dim=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(n)
    ks = [torch.randn(heads, n - 1, dim, generator=g).to(dtype) for _ in range(layers)]
    vs = [torch.randn(heads, n - 1, dim, generator=g).to(dtype) for _ in range(layers)]
    return KVRecord(list(range(100, 100 + n)), 4, "fp-abc", ks, vs, created_at=123.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(dtype):
    rec = make_record(dtype=dtype)
    out = decode(bytes(encode(rec)))
    assert out.token_ids == rec.token_ids
    assert out.num_prompt_tokens == 4 and out.fingerprint == "fp-abc" and out.created_at == 123.0
    for a, b in zip(out.keys + out.values, rec.keys + rec.values):
        assert a.dtype == dtype and torch.equal(a, b)


def test_single_token_record_has_empty_tensors():
    rec = make_record(n=1)
    out = decode(encode(rec))
    assert out.token_ids == [100] and out.keys[0].shape == (2, 0, 4)


def test_header_readable_without_checksum_pass():
    data = encode(make_record())
    header = read_header(data)
    assert header["num_tokens"] == 9 and header["fingerprint"] == "fp-abc"


@pytest.mark.parametrize("where", [0, 40, 200, -10, -1])
def test_any_flipped_byte_is_rejected(where):
    data = encode(make_record())
    data[where] ^= 0x40
    with pytest.raises(RecordError):
        decode(data)


@pytest.mark.parametrize("keep", [0, 7, 100, -5])
def test_truncated_record_is_rejected(keep):
    data = bytes(encode(make_record()))
    with pytest.raises(RecordError):
        decode(data[:keep] if keep >= 0 else data[:keep])


def test_inconsistent_shapes_refused_on_encode():
    rec = make_record()
    rec.values[1] = rec.values[1][:, :-1]  # one layer holds fewer positions than the others
    with pytest.raises(RecordError):
        encode(rec)


def test_meta_round_trips():
    rec = make_record()
    rec.meta = {"kind": "head", "blocks": ["a", "b"], "block_tokens": 8}
    assert decode(bytes(encode(rec))).meta == rec.meta

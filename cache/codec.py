"""KV record codec: one self-checking byte string per stored value (a block or a head).

Layout (all integers little-endian)::

    b"KVBR" | u16 version | u16 reserved | u32 header_len | header (JSON, zero-padded to 64 B)
    | token ids (int32 × num_tokens) | pad to 64 B | per layer: keys bytes, values bytes
    | u64 XXH3-64 checksum of everything before it

Tensor bytes are raw (no pickle); decoding returns tensors that view the input buffer, so a load
costs one checksum pass and no copy until the engine copies the rows into its batch.

The KV tensors hold the states of ``kv_len`` consecutive positions; what they mean (a block's own
tokens, a head's tail) is said by ``meta``, which the store checks on every load.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
import threading
from array import array
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import xxhash

MAGIC = b"KVBR"
# 3: blocks and heads (``meta``); version 2 records (one whole sequence per request_id) are a miss.
VERSION = 3
_PREFIX = struct.Struct("<4sHHI")
_CRC = struct.Struct("<Q")
_ALIGN = 64

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def element_size(dtype_name: object) -> int:
    """Bytes per element of a record's dtype, by the name its header gives (4 when unknown)."""
    dtype = _DTYPES.get(str(dtype_name))
    return dtype.itemsize if dtype is not None else 4


class RecordError(ValueError):
    """The bytes are not a valid record (truncated, corrupt, or another format version)."""


@dataclass
class KVRecord:
    """One stored value: token ids, per-layer KV of some of their positions, and metadata.

    Attributes:
        token_ids: a block's own tokens, or a head's whole sequence (prompt + generated).
        num_prompt_tokens: how many of a head's ``token_ids`` came from its first prompt.
        fingerprint: identity of the model (and dtype) that produced the tensors.
        keys / values: per layer, ``[kv_heads, kv_len, head_dim]``.
        created_at: unix time the value's sequence was first stored.
        meta: JSON-able facts the store writes and checks (kind, block hashes, where the KV starts).
    """

    token_ids: list[int]
    num_prompt_tokens: int
    fingerprint: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    created_at: float = field(default_factory=time.time)
    # Written into the header at every save: tells apart two saves of one request_id cheaply
    # (KVStore keeps its latest saves in memory and checks the stored header's nonce).
    nonce: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def kv_len(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _layout(record: KVRecord) -> tuple[bytes, list[torch.Tensor], int]:
    """Validate ``record``; return its header bytes, tensors in record order and total size."""
    n = len(record.token_ids)
    if n < 1:
        raise RecordError("a record needs at least one token")
    if len(record.keys) != len(record.values) or not record.keys:
        raise RecordError("keys and values must list the same, non-zero number of layers")
    dtype = record.keys[0].dtype
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise RecordError(f"unsupported dtype {dtype_name}")
    shapes = []
    kv_len = record.keys[0].shape[1] if record.keys[0].dim() == 3 else -1
    for k, v in zip(record.keys, record.values):
        if k.dim() != 3 or v.dim() != 3 or k.shape[1] != kv_len or v.shape[1] != kv_len:
            raise RecordError(f"layer shapes {tuple(k.shape)}/{tuple(v.shape)} do not all hold {kv_len} positions")
        if k.dtype != dtype or v.dtype != dtype:
            raise RecordError("all tensors of a record share one dtype")
        shapes.append([list(k.shape), list(v.shape)])
    header = json.dumps(
        {
            "fingerprint": record.fingerprint,
            "num_tokens": n,
            "num_prompt_tokens": record.num_prompt_tokens,
            "dtype": dtype_name,
            "shapes": shapes,
            "created_at": record.created_at,
            "nonce": record.nonce,
            "meta": record.meta,
        },
        separators=(",", ":"),
    ).encode()
    header += b" " * _pad(_PREFIX.size + len(header))
    tok_bytes = 4 * n
    tensors = [t for pair in zip(record.keys, record.values) for t in pair]
    body = sum(t.numel() * t.element_size() for t in tensors)
    total = _PREFIX.size + len(header) + tok_bytes + _pad(tok_bytes) + body + _CRC.size
    return header, tensors, total


# memcpy that keeps the GIL: a torch copy (or ctypes.memmove) releases it and, while another
# thread runs Python, waits up to the switch interval to take it back — per tensor (bench/NOTES.md).
_memcpy = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes.cast(ctypes.memmove, ctypes.c_void_p).value)


def _runs(t: torch.Tensor) -> list[tuple[int, int]] | None:
    """(address, bytes) of the contiguous runs that make ``t``'s bytes in row-major order, for a CPU
    tensor whose last dimensions are contiguous rows (a slice of positions of ``[heads, n, dim]``)."""
    if t.device.type != "cpu":
        return None
    esize, base = t.element_size(), t.data_ptr()
    if t.is_contiguous():
        return [(base, t.numel() * esize)]
    if t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        run = t.shape[1] * t.shape[2] * esize
        return [(base + i * t.stride(0) * esize, run) for i in range(t.shape[0])]
    return None


def _write(record: KVRecord, header: bytes, tensors: list[torch.Tensor], buf: bytearray) -> int:
    """Write the record into ``buf`` (at least as long as the record); return the record's length."""
    n = len(record.token_ids)
    _PREFIX.pack_into(buf, 0, MAGIC, VERSION, 0, len(header))
    off = _PREFIX.size
    buf[off : off + len(header)] = header
    off += len(header)
    ids = array("i", record.token_ids)
    if sys.byteorder != "little":
        ids.byteswap()
    buf[off : off + 4 * n] = memoryview(ids).cast("B")
    off += 4 * n
    buf[off : off + _pad(4 * n)] = bytes(_pad(4 * n))  # a reused buffer holds stale bytes here
    off += _pad(4 * n)
    dst = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else None
    for t in tensors:
        nb = t.numel() * t.element_size()
        if nb:
            runs = _runs(t)
            if runs is None:
                torch.frombuffer(buf, dtype=torch.uint8, count=nb, offset=off).view(t.dtype).view(t.shape).copy_(t)
            else:
                at = dst.data_ptr() + off
                for src, size in runs:
                    _memcpy(at, src, size)
                    at += size
        off += nb
    mv = memoryview(buf)
    _CRC.pack_into(buf, off, xxhash.xxh3_64_intdigest(mv[:off]))  # one pass: it releases the GIL too
    mv.release()
    return off + _CRC.size


def encode(record: KVRecord) -> bytearray:
    """Serialize ``record`` into a new buffer (single copy of the tensor bytes).

    Raises:
        RecordError: the tensors disagree with the token count or have an unsupported dtype.
    """
    header, tensors, total = _layout(record)
    buf = bytearray(total)
    _write(record, header, tensors, buf)
    return buf


# Reusable encode buffers. A fresh buffer costs a page fault per 4 KiB page on first write, which can
# be slower than the copy and the checksum together (bench/NOTES.md).
_POOL: list[bytearray] = []
_POOL_SIZE = 2  # retained memory: at most this many buffers of the largest record seen
_POOL_LOCK = threading.Lock()


@contextmanager
def encoded(record: KVRecord) -> Iterator[memoryview]:
    """Encode ``record`` into a pooled buffer; the view is valid only inside the ``with`` block.

    For writers that hand the bytes to a backend and forget them (``Backend.set`` is synchronous).

    Raises:
        RecordError: as ``encode``.
    """
    header, tensors, total = _layout(record)
    with _POOL_LOCK:
        buf = next((b for b in _POOL if len(b) >= total), None)
        if buf is not None:
            _POOL.remove(buf)
    if buf is None:
        buf = bytearray(total)
    view = memoryview(buf)[: _write(record, header, tensors, buf)]
    try:
        yield view
    finally:
        view.release()
        with _POOL_LOCK:
            _POOL.append(buf)
            if len(_POOL) > _POOL_SIZE:
                _POOL.remove(min(_POOL, key=len))


def read_header(data: bytes | bytearray | memoryview) -> dict:
    """Parse just the JSON header (no checksum pass): for metadata listings.

    Raises:
        RecordError: not a record of this version.
    """
    mv = memoryview(data)
    if len(mv) < _PREFIX.size + _CRC.size:
        raise RecordError("record truncated")
    magic, version, _, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise RecordError("not a kvbento record")
    if version != VERSION:
        raise RecordError(f"record format version {version}, expected {VERSION}")
    if _PREFIX.size + hlen > len(mv):
        raise RecordError("record truncated")
    try:
        return json.loads(bytes(mv[_PREFIX.size : _PREFIX.size + hlen]))
    except ValueError as exc:
        raise RecordError(f"record header unreadable: {exc}") from None


def decode(data: bytes | bytearray | memoryview) -> KVRecord:
    """Parse and verify a record. Returned tensors view ``data``: keep it alive, do not mutate it.

    Raises:
        RecordError: truncated, corrupt (checksum), wrong version or inconsistent shapes.
    """
    mv = memoryview(data)
    header = read_header(mv)
    end = len(mv) - _CRC.size
    (crc,) = _CRC.unpack_from(mv, end)
    if xxhash.xxh3_64_intdigest(mv[:end]) != crc:
        raise RecordError("record checksum mismatch")
    try:
        n = int(header["num_tokens"])
        dtype = _DTYPES[header["dtype"]]
        shapes = header["shapes"]
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"record header incomplete: {exc}") from None
    off = _PREFIX.size + _PREFIX.unpack_from(mv, 0)[3]
    with warnings.catch_warnings():
        # frombuffer warns on read-only bytes; the tensors are only ever read (copied into the batch).
        warnings.simplefilter("ignore", UserWarning)
        token_ids = torch.frombuffer(mv, dtype=torch.int32, count=n, offset=off).tolist()
        off += 4 * n + _pad(4 * n)
        keys, values = [], []
        esize = torch.empty((), dtype=dtype).element_size()
        for kshape, vshape in shapes:
            for shape, out in ((kshape, keys), (vshape, values)):
                count = 1
                for d in shape:
                    count *= d
                if off + count * esize > end:
                    raise RecordError("record body truncated")
                t = torch.frombuffer(mv, dtype=dtype, count=count, offset=off) if count else torch.empty(0, dtype=dtype)
                out.append(t.view(shape))
                off += count * esize
    if off != end:
        raise RecordError("record body has trailing bytes")
    return KVRecord(
        token_ids=token_ids,
        num_prompt_tokens=int(header.get("num_prompt_tokens", 0)),
        fingerprint=str(header.get("fingerprint", "")),
        keys=keys,
        values=values,
        created_at=float(header.get("created_at", 0.0)),
        nonce=str(header.get("nonce", "")),
        meta=header.get("meta") if isinstance(header.get("meta"), dict) else {},
    )

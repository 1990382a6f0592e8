"""The paged KV cache: one pool of fixed-size blocks per layer, and one step's view of it.

Layout: per layer ``values[l]`` of shape ``[num_blocks, block_size, kv_heads, head_dim]`` and
``keys[l]`` the same, or ``[num_blocks, kv_heads, head_dim, block_size]`` where the pool is read
by ``csrc/decode_attention.c`` (``keys_by_dim``: a block's keys side by side per dimension, the
operand its scores take, so it never transposes them); position ``p`` of a sequence lives in block
``table[p // block_size]`` at offset ``p % block_size`` (its *slot* is ``block * block_size +
offset``). Which blocks a sequence holds
is ``model.blocks.BlockManager``'s business; this module only moves tensors: a forward writes
each new token's K/V into its slot, attention reads the block tables (``model.attention``), a
restored prefix is written into its blocks and a finished sequence's KV is copied out of them.
A sequence joins, grows, forks and leaves without touching any other sequence's memory.

``StepBatch`` describes one forward: the packed tokens of every scheduled sequence (decode
tokens and prefill chunks alike), where each one's K/V goes and what each query attends to.
``PagedCache`` is the transformers ``Cache`` the HF forward writes through.
"""

from __future__ import annotations

import ctypes
import os

import torch
from transformers.cache_utils import Cache

from model import memory, native

KV = tuple[list[torch.Tensor], list[torch.Tensor]]  # per layer [kv_heads, n, head_dim]


class KVPool:
    """The block tensors. Not thread-safe: owned by the engine thread."""

    PREFAULT_AHEAD_BYTES = 256 << 20  # faulted in past the highest block handed out so far

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_blocks: int, block_size: int, native_copy: bool = True,
                 keys_by_dim: bool = False) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.num_blocks, self.block_size = num_blocks, block_size
        self.keys_by_dim = keys_by_dim
        shape = (num_blocks, block_size, kv_heads, head_dim)
        key_shape = (num_blocks, kv_heads, head_dim, block_size) if keys_by_dim else shape
        # Not zeroed (no reader looks past a sequence's own positions) but faulted in on a thread
        # ahead of the blocks in use: a first touch inside a step cost more than the step's K/V
        # write, and faulting the whole pool in at start took a core for seconds.
        self.keys = [memory.empty(key_shape, dtype, device) for _ in range(num_layers)]
        self.values = [memory.empty(shape, dtype, device) for _ in range(num_layers)]
        self.prefault = memory.Prefaulter(self.keys + self.values, num_blocks) if device.type == "cpu" else None
        self.blocks_ahead = max(1, self.PREFAULT_AHEAD_BYTES // self.block_bytes)
        self.prefault_ahead(0)
        self._copy = native.COPY.load() if native_copy and device.type == "cpu" else None
        if self._copy is not None:
            ptrs = ctypes.c_void_p * num_layers
            self._ptrs = (ptrs(*(t.data_ptr() for t in self.keys)), ptrs(*(t.data_ptr() for t in self.values)))

    def prefault_ahead(self, high_water: int) -> None:
        """Have the blocks up to ``blocks_ahead`` past ``high_water`` (one more than the highest
        block id handed out) faulted in."""
        if self.prefault is not None:
            self.prefault.want(high_water + self.blocks_ahead)

    @staticmethod
    def bytes_per_block(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                        block_size: int) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_block(self.num_layers, self.kv_heads, self.head_dim, self.dtype, self.block_size)

    def rows(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s K and V at ``slots``, each ``[n, kv_heads, head_dim]`` (copies)."""
        values = self.values[layer].view(-1, self.kv_heads, self.head_dim).index_select(0, slots)
        if self.keys_by_dim:
            return self.keys[layer][slots // self.block_size, :, :, slots % self.block_size], values
        return self.keys[layer].view(-1, self.kv_heads, self.head_dim).index_select(0, slots), values

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of positions ``[start, end)`` of a sequence with block table ``table``."""
        b = self.block_size
        pos = torch.arange(start, end, dtype=torch.long)
        blocks = torch.tensor(table, dtype=torch.long)[pos // b] if end > start else pos
        return (blocks * b + pos % b).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys`` / ``values`` ``[n, kv_heads, head_dim]`` into ``slots``."""
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        if self._copy is not None:  # one call, no GIL hand-off
            keys, values, slots = keys.contiguous(), values.contiguous(), slots.contiguous()
            self._copy.kvb_write_rows(self.keys[layer].data_ptr(), self.values[layer].data_ptr(), slots.data_ptr(),
                                      slots.shape[0], keys.data_ptr(), values.data_ptr(), self.block_size,
                                      self.kv_heads, self.head_dim, self.dtype.itemsize, self.keys_by_dim)
            return
        self.values[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, values)
        if self.keys_by_dim:
            self.keys[layer][slots // self.block_size, :, :, slots % self.block_size] = keys
        else:
            self.keys[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, keys)

    def copy_block(self, src: int, dst: int) -> None:
        for t in (*self.keys, *self.values):
            t[dst].copy_(t[src])

    def load(self, table: list[int], start: int, chunks: list[KV], chunks_from: int = 0) -> int:
        """Write restored KV ``chunks`` (consecutive, from position ``chunks_from``) into ``table``
        from position ``start`` on (the positions before are in the pool already). Returns the end."""
        at = chunks_from
        for keys, values in chunks:
            n = keys[0].shape[1] if keys else 0
            lo = max(at, start)
            if n and lo < at + n:
                slots = self.slots(table, lo, at + n)
                for l in range(self.num_layers):
                    k = keys[l][:, lo - at:].to(self.device).transpose(0, 1)
                    v = values[l][:, lo - at:].to(self.device).transpose(0, 1)
                    self.write(l, slots, k, v)
            at += n
        return max(at, start)

    def extract(self, table: list[int], start: int, end: int) -> KV:
        """Copy positions ``[start, end)`` to host memory: per layer contiguous ``[kv_heads, n,
        head_dim]`` CPU tensors, views of one reused buffer (bench/NOTES.md)."""
        n = max(0, end - start)
        per = self.kv_heads * n * self.head_dim
        flat = memory.reused(2 * self.num_layers * max(per, 1), self.dtype)
        out = [flat[i * per : (i + 1) * per].view(self.kv_heads, n, self.head_dim)
               for i in range(2 * self.num_layers)]
        if self._copy is not None and n:  # one native call: no GIL hand-off per (block, layer)
            table_c = (ctypes.c_int64 * len(table))(*table)
            self._copy.kvb_copy_out(self.num_layers, self._ptrs[0], self._ptrs[1], table_c, start, end,
                                    self.block_size, self.kv_heads, self.head_dim, self.dtype.itemsize,
                                    self.keys_by_dim, flat.data_ptr())
            return out[0::2], out[1::2]
        # Block by block, straight from the pool (a gather would allocate, and fault in, a temporary)
        b, at = self.block_size, start
        while at < end:
            blk, off = table[at // b], at % b
            m = min(end - at, b - off)
            for l in range(self.num_layers):
                k = self.keys[l][blk, :, :, off:off + m].transpose(1, 2) if self.keys_by_dim \
                    else self.keys[l][blk, off:off + m].transpose(0, 1)
                out[2 * l][:, at - start:at - start + m].copy_(k)
                out[2 * l + 1][:, at - start:at - start + m].copy_(self.values[l][blk, off:off + m].transpose(0, 1))
            at += m
        return out[0::2], out[1::2]


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def pool_blocks(block_bytes: int, device: torch.device, blocks_per_seq: int, max_batch: int,
                cache_bytes: int, share: float) -> int:
    """Blocks of the pool: ``cache_bytes`` of them, else ``share`` of the memory available now,
    at most ``max_batch`` sequences of ``blocks_per_seq``; never fewer than one such sequence needs
    (a lone request always fits, so a waiting one is never stuck)."""
    if cache_bytes:
        n = cache_bytes // block_bytes
    else:
        n = min(int(_available_bytes(device) * share) // block_bytes, blocks_per_seq * max_batch)
    return max(n, blocks_per_seq)


class StepBatch:
    """One forward over packed tokens: sequence ``i`` brings ``q_lens[i]`` query tokens at
    positions ``ctx_lens[i] - q_lens[i] .. ctx_lens[i] - 1`` and attends to its positions
    ``[0, ctx_lens[i])`` through ``tables[i]`` (whose blocks hold them once this step's tokens
    are written)."""

    def __init__(self, pool: KVPool, tables: list[list[int]], q_lens: list[int], ctx_lens: list[int],
                 native: bool) -> None:
        self.pool = pool
        self.tables, self.q_lens, self.ctx_lens = tables, q_lens, ctx_lens
        self.native = native
        self.num_tokens = sum(q_lens)
        # Built as Python lists and turned into tensors once: a decode step has one position per
        # sequence, and a few small tensor ops per sequence cost more than the arithmetic.
        b, positions, slots = pool.block_size, [], []
        for table, q, c in zip(tables, q_lens, ctx_lens):
            positions.extend(range(c - q, c))
            slots.extend(table[p // b] * b + p % b for p in range(c - q, c))
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=pool.device)
        self._gather: list[torch.Tensor] | None = None
        self._native_meta: tuple[torch.Tensor, ...] | None = None
        self.layer = 0  # the layer whose K/V was written last (PagedCache.update sets it)

    def gather_slots(self) -> list[torch.Tensor]:
        """Per sequence, the slots of its positions ``[0, ctx_len)`` (the torch path's gather)."""
        if self._gather is None:
            self._gather = [self.pool.slots(t, 0, c) for t, c in zip(self.tables, self.ctx_lens)]
        return self._gather

    def native_meta(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence of each token [T], position of each token [T], block tables [S, max_blocks]),
        int64 on the CPU, for the native kernel."""
        if self._native_meta is None:
            seq = torch.tensor([i for i, q in enumerate(self.q_lens) for _ in range(q)], dtype=torch.long)
            width = max(len(t) for t in self.tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.long)
            self._native_meta = (seq, self.positions.contiguous(), tables)
        return self._native_meta


class _PagedLayer:
    """Stands in for a transformers cache layer (only the attributes models read)."""

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def get_seq_length(self) -> int:
        return 0


class PagedCache(Cache):
    """The transformers ``Cache`` of one packed forward: ``update`` writes the new K/V into the
    pool slots of ``batch`` and hands them back untouched (``model.attention`` reads the pool)."""

    def __init__(self, batch: StepBatch) -> None:
        super().__init__(layers=[_PagedLayer() for _ in range(batch.pool.num_layers)])
        self.batch = batch

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        b = self.batch
        # [1, kv_heads, T, d] -> [T, kv_heads, d]
        b.pool.write(layer_idx, b.slot_mapping, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        b.layer = layer_idx
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

"""The running batch's KV cache: one preallocated slab per layer, rows are sequences.

Layout: per layer ``keys[l]`` / ``values[l]`` of shape ``[rows, kv_heads, capacity, head_dim]``.
Rows are left-padded so every row's newest token sits at column ``end - 1``; a decode step writes
column ``end`` for all rows in place (no concatenation, no copy of the past). A sequence joins by
writing its KV into a free row, and leaves by freeing its row; neither touches the other rows.
The slab is re-laid out (one copy) only when it runs out of columns or rows, with headroom so
that happens rarely, and it is kept across idle periods (its size is the high-water mark of the
running batch, as with any preallocated KV pool). The forward sees ``[:num_rows, :, start:end + 1]``
views through ``SlabCache``, a transformers ``Cache`` whose layers write into the slab.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from model import memory


class _SlabLayer(DynamicLayer):
    """One layer's view of the slab for one forward pass."""

    def __init__(self, slab: "BatchKV", layer_idx: int) -> None:
        super().__init__()
        self.slab = slab
        self.layer_idx = layer_idx
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        s = self.slab
        n, q = key_states.shape[0], key_states.shape[2]
        k, v = s.keys[self.layer_idx], s.values[self.layer_idx]
        k[:n, :, s.end : s.end + q] = key_states
        v[:n, :, s.end : s.end + q] = value_states
        return k[:n, :, s.start : s.end + q], v[:n, :, s.start : s.end + q]

    def get_seq_length(self) -> int:
        return self.slab.end - self.slab.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slab.end - self.slab.start + query_length, 0

    def get_max_length(self) -> int:
        return -1


class SlabCache(Cache):
    def __init__(self, slab: "BatchKV") -> None:
        super().__init__(layers=[_SlabLayer(slab, i) for i in range(slab.num_layers)])


class _BufferLayer(DynamicLayer):
    """One layer of a prefill's cache: writes go into a preallocated buffer, reads are views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.buf_keys, self.buf_values = keys, values
        self.length = 0
        self.is_initialized = True
        self.keys, self.values = keys[:, :, :0], values[:, :, :0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[2]
        self.buf_keys[:, :, self.length : end] = key_states
        self.buf_values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.buf_keys[:, :, :end], self.buf_values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


class PrefillBuffer:
    """Per-layer ``[1, kv_heads, capacity, head_dim]`` buffers that a prefill (its restored prefix,
    then its chunks) writes into, kept from one prefill to the next: a ``DynamicCache`` instead
    concatenates the whole past on every chunk, into fresh memory that pays first-touch faults.
    Only one sequence prefills at a time, so one buffer serves them all.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, column_chunk: int = 256) -> None:
        self.geometry = (num_layers, kv_heads, head_dim)
        self.dtype, self.device, self.chunk = dtype, device, column_chunk
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, num_tokens: int) -> None:
        """Allocate and touch buffers for ``num_tokens`` positions (at start, as the slab's
        reserve): fresh memory costs first-touch faults, on some VMs 100+ ms per 100 MB."""
        layers, heads, dim = self.geometry
        shape = (1, heads, -(-num_tokens // self.chunk) * self.chunk, dim)
        self.keys = [memory.empty(shape, self.dtype, self.device).zero_() for _ in range(layers)]
        self.values = [memory.empty(shape, self.dtype, self.device).zero_() for _ in range(layers)]

    def cache(self, num_tokens: int, prefix: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> Cache:
        """A cache for a prefill of ``num_tokens`` positions in all, holding ``prefix`` (KV chunks,
        per layer ``[kv_heads, n, head_dim]``) already. Valid until the next call."""
        if num_tokens > self.capacity:  # grows by half at least: conversations grow turn by turn
            self.reserve(max(num_tokens, self.capacity * 3 // 2))
        cache = Cache(layers=[_BufferLayer(k, v) for k, v in zip(self.keys, self.values)])
        for keys, values in prefix:
            for i, layer in enumerate(cache.layers):
                layer.update(keys[i].to(self.device).unsqueeze(0), values[i].to(self.device).unsqueeze(0))
        return cache


class BatchKV:
    """Row/column bookkeeping of the slab. Not thread-safe: owned by the engine thread."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_rows: int, column_chunk: int = 256) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.max_rows = max_rows
        self.chunk = column_chunk
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.start = self.end = 0
        self.row_len: list[int] = []  # tokens in each row's KV; -1 = free row
        self.num_relayouts = 0
        self._reserved: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None

    # -- geometry --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def num_rows(self) -> int:
        """Rows the forward must cover: up to the last occupied row."""
        for i in range(len(self.row_len) - 1, -1, -1):
            if self.row_len[i] >= 0:
                return i + 1
        return 0

    @property
    def active_rows(self) -> list[int]:
        return [i for i, n in enumerate(self.row_len) if n >= 0]

    def _relayout(self, rows: int, capacity: int, end: int) -> None:
        """Move every row's live span to end at column ``end`` of a [rows, capacity] slab.

        The same shape compacts in place (through a copy of the live window only); a new shape
        allocates a fresh slab whose columns outside the live spans are zeroed: masked columns
        still enter the fallback attention matmul, and uninitialised memory may hold NaN.
        """
        old_rows = len(self.row_len)
        span = self.end - self.start
        new_start = end - span
        assert new_start >= 0 and end <= capacity and all(n < 0 for n in self.row_len[rows:])
        keep = min(old_rows, rows)
        if self._relayout_in_reserve(rows, capacity, end):
            return
        if self.keys and rows == old_rows and capacity == self.capacity:
            if span and new_start != self.start:
                for t in (*self.keys, *self.values):
                    live = t[:, :, self.start : self.end].clone()
                    t[:, :, new_start:end] = live
                live = self.mask[:, self.start : self.end].clone()
                self.mask.zero_()
                self.mask[:, new_start:end] = live
            self.start, self.end = new_start, end
            self.num_relayouts += 1
            return
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        new_k, new_v = [], []
        for i in range(self.num_layers):
            for old, out in ((self.keys, new_k), (self.values, new_v)):
                fresh = memory.empty(shape, self.dtype, self.device)
                fresh[:, :, :new_start].zero_()
                fresh[:, :, end:].zero_()
                if span and keep and old:
                    fresh[:keep, :, new_start:end] = old[i][:keep, :, self.start : self.end]
                    fresh[keep:, :, new_start:end].zero_()
                else:
                    fresh[:, :, new_start:end].zero_()
                out.append(fresh)
        self._set_layout(new_k, new_v, rows, capacity, new_start, end)

    def _set_layout(self, keys: list[torch.Tensor], values: list[torch.Tensor], rows: int,
                    capacity: int, new_start: int, end: int) -> None:
        keep = min(len(self.row_len), rows)
        mask = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        if self.end > self.start and keep:
            mask[:keep, new_start:end] = self.mask[:keep, self.start : self.end]
        self.keys, self.values, self.mask = keys, values, mask
        self.row_len = self.row_len[:rows] + [-1] * (rows - len(self.row_len))
        self.start, self.end = new_start, end
        self.num_relayouts += 1

    def _relayout_in_reserve(self, rows: int, capacity: int, end: int) -> bool:
        """``_relayout`` inside the reserve's memory, when the slab is laid out there and the new
        layout fits it, is no narrower and moves no column left: then every (row, head) span only
        moves to a higher address, so moving them from the last down never overwrites one not yet
        moved. A fresh slab instead costs first-touch faults on all of it, seconds for a GiB.
        """
        res = self._reserved
        new_start = end - (self.end - self.start)
        if (res is None or not self.keys or self.keys[0].data_ptr() != res[0][0].data_ptr()
                or capacity < self.capacity or new_start < self.start
                or rows * self.kv_heads * capacity * self.head_dim > res[0][0].numel()):
            return False
        heads, dim, old_cap = self.kv_heads, self.head_dim, self.capacity
        n = (self.end - self.start) * dim
        shape = (rows, heads, capacity, dim)
        new_k, new_v = [], []
        for reserve, out in ((res[0], new_k), (res[1], new_v)):
            for t in reserve:
                flat = t.view(-1)
                for r in reversed(self.active_rows):  # a row's heads at once, through a copy
                    src = flat.as_strided((heads, n), (old_cap * dim, 1), (r * heads * old_cap + self.start) * dim)
                    dst = flat.as_strided((heads, n), (capacity * dim, 1), (r * heads * capacity + new_start) * dim)
                    if n:
                        dst.copy_(src.clone())
                out.append(flat[: rows * heads * capacity * dim].view(shape))
        self._set_layout(new_k, new_v, rows, capacity, new_start, end)
        return True

    def reserve(self, rows: int, capacity: int) -> None:
        """Allocate (and touch) the slab up front, as a server does with its KV pool at start."""
        if not self.active_rows and (rows > len(self.row_len) or capacity > self.capacity):
            self.start = self.end = 0
            self._relayout(min(max(rows, len(self.row_len)), self.max_rows),
                           self._round(max(capacity, self.capacity)), 0)
        self._reserved = (self.keys, self.values, self.mask)

    def _restart(self, n: int) -> None:
        """Pick the tensors an idle slab starts over with, for a first sequence of ``n`` tokens.

        A lone request attends over row 0 only, whatever the slab's size. The reserved slab is
        kept for the life of the engine and taken back whenever the sequence fits it. A longer one
        gets the reserve's memory laid out anew, as fewer rows of more columns (32 x 512 holds 12
        rows of 1,280): widening every reserved row would cost rows x its length, and a fresh slab
        costs first-touch faults on every byte, many times the copy into it (bench/NOTES.md). Only
        when even one row of the reserve is too short is a new slab made (by ``insert``).
        """
        res = self._reserved
        if res is not None and n + 1 <= res[2].shape[1]:
            if self.keys is not res[0]:
                self.keys, self.values, self.mask = res
                self.row_len = [-1] * self.mask.shape[0]
        elif (not self.keys or n + 1 > self.capacity) and not self._lay_out_reserve(n):
            self.keys, self.values, self.row_len = [], [], []
            self.mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
            self.start = self.end = 0
            return
        self.row_len = [-1] * len(self.row_len)
        self.mask.zero_()
        self.start = self.end = n

    def _lay_out_reserve(self, n: int) -> bool:
        """Use the reserve's memory (idle slab only) as ``rows x capacity`` for ``n``-token rows.

        The columns keep stale KV values of earlier sequences (finite numbers, like a freed row's),
        never uninitialised memory; the mask hides them.
        """
        if self._reserved is None:
            return False
        capacity = self._round(n + self.chunk)
        res_k, res_v, _ = self._reserved
        per_row = self.kv_heads * capacity * self.head_dim
        rows = min(self.max_rows, res_k[0].numel() // per_row)
        if rows < 1:
            return False
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.keys = [t.view(-1)[: rows * per_row].view(shape) for t in res_k]
        self.values = [t.view(-1)[: rows * per_row].view(shape) for t in res_v]
        self.mask = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        self.row_len = [-1] * rows
        return True

    def _rows_for(self, capacity: int, at_least: int) -> int:
        """Rows for a relayout to ``capacity`` columns: as many as now where the reserve's memory
        holds them, else fewer (free rows past the last live one go), never under ``at_least``."""
        fit = self._reserved[0][0].numel() // (self.kv_heads * capacity * self.head_dim) if self._reserved else 0
        return max(at_least, min(len(self.row_len), fit))

    def _round(self, n: int) -> int:
        return -(-n // self.chunk) * self.chunk

    # -- join / leave ----------------------------------------------------------------------
    def insert(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
        """Place one sequence's KV (per layer ``[kv_heads, n, head_dim]``) in a free row.

        Returns:
            The row index, stable until ``remove``.
        """
        return self.insert_chunks([(keys, values)] if keys else [])

    def insert_chunks(self, chunks: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> int:
        """``insert`` for KV given as consecutive chunks (restored blocks): no concatenation."""
        n = sum(c[0][0].shape[1] for c in chunks if c[0])
        if not self.active_rows:
            self._restart(n)
        free = [i for i, ln in enumerate(self.row_len) if ln < 0]
        need_left = max(0, n - self.end)
        if need_left or not free or self.end + 1 > self.capacity:
            new_end = max(self.end, n, self.end - self.start)
            capacity = max(self._round(new_end + self.chunk), self.capacity)
            if free:
                rows = self._rows_for(capacity, max(self.num_rows, free[0] + 1))
            else:
                rows = min(self.max_rows, max(1, 2 * len(self.row_len)))
            self._relayout(rows, capacity, new_end)
        row = next(i for i, ln in enumerate(self.row_len) if ln < 0)
        lo = self.end - n
        at = lo
        for keys, values in chunks:
            m = keys[0].shape[1] if keys else 0
            if not m:
                continue
            for l in range(self.num_layers):
                self.keys[l][row, :, at : at + m] = keys[l].to(self.device)
                self.values[l][row, :, at : at + m] = values[l].to(self.device)
            at += m
        self.mask[row].zero_()
        self.mask[row, lo : self.end] = True
        self.row_len[row] = n
        self.start = min(self.start, lo) if len(self.active_rows) > 1 else lo
        return row

    def copy_row(self, src: int) -> int:
        """A free row holding a copy of row ``src``'s KV (a sibling choice forks a prefilled prompt).

        Returns:
            The new row's index, stable until ``remove``.
        """
        if all(n >= 0 for n in self.row_len):  # no free row: double the rows, columns as they are
            self._relayout(min(self.max_rows, max(1, 2 * len(self.row_len))), self.capacity, self.end)
        row = next(i for i, ln in enumerate(self.row_len) if ln < 0)
        n = self.row_len[src]
        lo = self.end - n
        for t in (*self.keys, *self.values):
            t[row, :, lo : self.end] = t[src, :, lo : self.end]
        self.mask[row].zero_()
        self.mask[row, lo : self.end] = True
        self.row_len[row] = n
        return row

    def remove(self, row: int) -> None:
        """Free ``row``; its columns are simply masked out."""
        self.row_len[row] = -1
        self.mask[row].zero_()
        active = self.active_rows
        if active:
            self.start = min(self.end - self.row_len[i] for i in active)
        else:
            self.start = self.end

    def extract(self, row: int, end: int | None = None,
                start: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copy KV columns ``[start, end)`` (default all) of ``row`` to host memory: per layer
        contiguous ``[kv_heads, n, head_dim]`` CPU tensors, views of one huge-page buffer (fresh
        pages cost more in first-touch faults than the copy; see bench/NOTES.md)."""
        end = self.row_len[row] if end is None else min(end, self.row_len[row])
        start = min(start, end)
        n = end - start
        lo = self.end - self.row_len[row] + start
        per = self.kv_heads * n * self.head_dim
        flat = memory.empty((2 * self.num_layers * max(per, 1),), self.dtype, torch.device("cpu"))
        out = [flat[i * per : (i + 1) * per].view(self.kv_heads, n, self.head_dim)
               for i in range(2 * self.num_layers)]
        for l in range(self.num_layers):
            out[2 * l].copy_(self.keys[l][row, :, lo : lo + n])
            out[2 * l + 1].copy_(self.values[l][row, :, lo : lo + n])
        return out[0::2], out[1::2]

    # -- decode ----------------------------------------------------------------------------
    def prepare_step(self) -> tuple[SlabCache, torch.Tensor, int, torch.Tensor]:
        """Make room for one more column; return (cache, additive mask [rows, 1, 1, kv], num_rows,
        first live column per row [rows] (CPU int64, for the native decode kernel))."""
        if self.end + 1 > self.capacity:
            span = self.end - self.start
            if span + self.chunk + 1 <= self.capacity:
                self._relayout(len(self.row_len), self.capacity, span)  # compact in place
            else:
                wide = self._round(self.end + self.chunk + 1)
                if not self._relayout_in_reserve(self._rows_for(wide, max(self.num_rows, 1)), wide, self.end):
                    self._relayout(max(self.num_rows, 1), self._round(span + self.chunk + 1), span)
        rows = self.num_rows
        self.mask[:rows, self.end] = True  # free rows attend to their own slot: no empty softmax
        # A 4D additive mask is used as is by the model: HF does not rebuild it per layer or step.
        live = self.mask[:rows, self.start : self.end + 1]
        bias = torch.zeros(live.shape, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~live, float("-inf"))
        # First live column of each row in the window (free rows: their own slot, the last one).
        width = self.end + 1 - self.start
        lo = torch.tensor([self.end - n - self.start if n >= 0 else width - 1 for n in self.row_len[:rows]],
                          dtype=torch.int64)
        return SlabCache(self), bias[:, None, None, :], rows, lo

    def finish_step(self) -> None:
        for i, n in enumerate(self.row_len):
            if n >= 0:
                self.row_len[i] = n + 1
            else:
                self.mask[i, self.end] = False
        self.end += 1

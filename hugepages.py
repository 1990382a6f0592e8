"""Large CPU tensors that fault in fast, or before they are needed, or only once.

A fresh multi-megabyte buffer is touched page by page on its first write; with 4 KiB pages that
fault storm costs more than copying the data into it. With THP in ``madvise`` mode (the common
Linux default) 2 MiB pages cut it several times over on some hosts (figures in bench/NOTES.md);
``populate`` faults a tensor in ahead of use (the KV pool, ahead of the blocks handed out);
``BufferPool`` reuses buffers so they fault in once. Used by the engine (the KV pool and its copy-outs,
model/memory.py) and the store (the buffers records are read into, cache/memory.py), which import
nothing of each other.
"""

from __future__ import annotations

import ctypes
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+

try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if _libc is not None:
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _libc = None


def advise_huge(t: torch.Tensor) -> torch.Tensor:
    """Ask for huge pages on the 2 MiB-aligned interior of a CPU tensor not yet touched."""
    if t.device.type == "cpu" and t.nbytes >= HUGE_PAGE and _libc is not None:
        addr = t.data_ptr()
        lo = -(-addr // HUGE_PAGE) * HUGE_PAGE
        hi = (addr + t.nbytes) // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE)
    return t


def populate(t: torch.Tensor, start: int = 0, end: int | None = None) -> bool:
    """Fault in bytes ``[start, end)`` of CPU tensor ``t`` writable now, without changing them
    (safe while other threads write into it). False where the kernel cannot (before 5.14)."""
    if t.device.type != "cpu" or _libc is None:
        return False
    end = t.nbytes if end is None else min(end, t.nbytes)
    lo = (t.data_ptr() + start) // 4096 * 4096
    hi = t.data_ptr() + end
    return hi <= lo or _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_WRITE) == 0


def byte_buffer(nbytes: int) -> memoryview:
    """A writable, huge-page-advised byte buffer (e.g. to ``readinto``)."""
    t = advise_huge(torch.empty(nbytes, dtype=torch.uint8))
    return memoryview(t.numpy()).cast("B")


class BufferPool:
    """Byte buffers reused once nothing refers to them any more (the store's read buffers, the
    engine's KV copy-outs).

    A record load or a copy-out fills tens of MB; in fresh memory that is first-touch faults on
    every page, and on a VM whose host backs guest memory lazily they can cost more than the copy
    itself, at random (bench/NOTES.md). Records and copy-outs are views of the buffer, so a buffer is reused only when no view of it is left: each
    hands out ``memoryview``s of one numpy array, and the array's reference count says whether one
    (or a tensor made from one) is alive.
    """

    def __init__(self, limit_bytes: int = 512 << 20, granule: int = 2 << 20) -> None:
        self.limit = limit_bytes
        self.granule = granule
        self._lock = threading.Lock()
        # Parallel lists: the arrays, and each one's reference count when nothing else holds it.
        # Counts are only ever taken as ``sys.getrefcount(self._arrays[i])`` (the list's reference
        # and the call's own), so they compare like with like.
        self._arrays: list = []
        self._free_refs: list[int] = []

    def buffer_size(self, nbytes: int) -> int:
        # Whole huge pages for large reads; small ones (a tiny model's blocks) by 64 KiB.
        step = self.granule if nbytes >= self.granule else 64 << 10
        return -(-max(nbytes, 1) // step) * step

    def _idle(self, i: int) -> bool:
        return sys.getrefcount(self._arrays[i]) <= self._free_refs[i]

    def take(self, nbytes: int) -> memoryview:
        """A writable buffer of exactly ``nbytes`` (pooled when it fits the pool's limit)."""
        with self._lock:
            fits = [i for i in range(len(self._arrays))
                    if nbytes <= self._arrays[i].nbytes <= 2 * nbytes + self.granule and self._idle(i)]
            if fits:
                best = min(fits, key=lambda i: self._arrays[i].nbytes)
                return memoryview(self._arrays[best])[:nbytes]
            size = self.buffer_size(nbytes)
            # Make room: buffers nobody uses go, smallest first, as many as needed.
            held = self.nbytes
            keep = [True] * len(self._arrays)
            for i in sorted(range(len(self._arrays)), key=lambda i: self._arrays[i].nbytes):
                if held + size <= self.limit:
                    break
                if self._idle(i):
                    held -= self._arrays[i].nbytes
                    keep[i] = False
            self._arrays = [a for a, k in zip(self._arrays, keep) if k]
            self._free_refs = [r for r, k in zip(self._free_refs, keep) if k]
            if held + size > self.limit:
                return byte_buffer(nbytes)  # too big for the pool, or the pool is busy
            self._arrays.append(advise_huge(torch.empty(size, dtype=torch.uint8)).numpy())
            self._free_refs.append(sys.getrefcount(self._arrays[-1]))
            return memoryview(self._arrays[-1])[:nbytes]

    def prefault(self, nbytes: int, count: int) -> int:
        """Allocate ``count`` buffers that fit ``nbytes`` and touch every page now, within the
        limit: a server calls this at start so that its first loads find warm memory. Returns how
        many buffers the pool holds for that size."""
        size = self.buffer_size(nbytes)
        with self._lock:
            have = sum(1 for a in self._arrays if nbytes <= a.nbytes <= 2 * nbytes + self.granule)
            while have < count and self.nbytes + size <= self.limit:
                self._arrays.append(advise_huge(torch.empty(size, dtype=torch.uint8)).numpy())
                self._arrays[-1].fill(0)
                self._free_refs.append(sys.getrefcount(self._arrays[-1]))
                have += 1
            return have

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

"""Large CPU tensors that fault in fast: transparent huge pages on request.

A fresh multi-megabyte buffer is touched page by page on its first write; with 4 KiB pages that
fault storm costs more than copying the data into it. With THP in ``madvise`` mode (the common
Linux default) 2 MiB pages cut it several times over (figures in bench/NOTES.md). Used by the
engine (the KV pool and its copy-outs, model/memory.py) and the store (the buffers records are read
into, cache/memory.py), which import nothing of each other.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14

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

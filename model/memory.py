"""Large CPU tensors of the engine (the KV pool and its copy-outs, model/kv.py), huge-page advised,
faulted in ahead, and reused (hugepages.py)."""

from __future__ import annotations

import threading

import torch

from hugepages import HUGE_PAGE, BufferPool, advise_huge, populate

__all__ = ["HUGE_PAGE", "advise_huge", "empty", "populate_later", "reused"]

# Copy-outs of finished sequences' KV wait here for the store's writers (and stay viewed by the
# store's recent blocks, 512 MiB by default); reused once nothing views them.
_copy_outs = BufferPool(limit_bytes=768 << 20)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` with huge pages advised (CPU, large tensors)."""
    return advise_huge(torch.empty(shape, dtype=dtype, device=device))


def reused(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor from the copy-out buffers: faulted in once, reused when nothing views it."""
    buf = _copy_outs.take(max(1, numel) * dtype.itemsize)
    return torch.frombuffer(buf, dtype=dtype)[:numel]


def populate_later(tensors: list[torch.Tensor], step: int) -> threading.Thread:
    """Fault ``tensors`` (same size) in on a background thread, ``step`` bytes of each in turn from
    the start (where the lowest blocks, handed out first, live), so that no engine step pays a
    first touch; their contents are left alone."""
    def run() -> None:
        size = tensors[0].nbytes if tensors else 0
        for lo in range(0, size, step):
            for t in tensors:
                if not populate(t, lo, lo + step):
                    return

    th = threading.Thread(target=run, name="kvbento-kv-populate", daemon=True)
    th.start()
    return th

"""Large CPU tensors of the engine (the KV pool and its copy-outs, model/kv.py), huge-page advised,
faulted in ahead, and reused (hugepages.py)."""

from __future__ import annotations

import threading

import torch

from hugepages import HUGE_PAGE, BufferPool, advise_huge, populate

__all__ = ["HUGE_PAGE", "Prefaulter", "advise_huge", "empty", "reused"]

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


class Prefaulter:
    """Faults the leading blocks of same-shaped pool tensors in on a thread, ahead of the blocks
    handed out (lowest ids first), so that no engine step pays a first touch; contents are left
    alone.

    A call covers ``step`` bytes of one tensor: ``MADV_POPULATE_WRITE`` holds the process's
    memory-map lock while it runs, and a thread that maps memory meanwhile (an allocation, holding
    the GIL) waits for it. 32 MiB calls over a whole 5 GiB pool stalled the event loop ~70 ms at a
    time for the first ~15 s of a server (bench/NOTES.md).
    """

    def __init__(self, tensors: list[torch.Tensor], num_blocks: int, step: int = HUGE_PAGE) -> None:
        self._tensors = tensors
        self._block_bytes = tensors[0].nbytes // num_blocks if tensors else 0
        self.num_blocks, self.step = num_blocks, step
        self._done = 0  # bytes of every tensor faulted in
        self._target = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvbento-kv-prefault", daemon=True)
        self._thread.start()

    def want(self, num_blocks: int) -> None:
        """Fault blocks ``[0, num_blocks)`` in (from where it got to)."""
        target = min(num_blocks, self.num_blocks) * self._block_bytes
        if target > self._target:
            with self._cond:
                self._target = max(self._target, target)
                self._cond.notify()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until all wanted blocks are in; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._target, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.notify_all()  # waiters of what is done so far
                self._cond.wait_for(lambda: self._done < self._target)
                lo, hi = self._done, min(self._target, self._done + self.step)
            for t in self._tensors:
                if not populate(t, lo, hi):
                    with self._cond:  # the kernel cannot: first touches it is
                        self._done = self._target = self.num_blocks * self._block_bytes
                        self._cond.notify_all()
                    return
            self._done = hi

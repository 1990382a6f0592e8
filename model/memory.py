"""Large CPU tensors of the engine (the KV pool and its copy-outs, model/kv.py), huge-page advised
(hugepages.py)."""

from __future__ import annotations

import torch

from hugepages import HUGE_PAGE, advise_huge

__all__ = ["HUGE_PAGE", "advise_huge", "empty"]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` with huge pages advised (CPU, large tensors)."""
    return advise_huge(torch.empty(shape, dtype=dtype, device=device))

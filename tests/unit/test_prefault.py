"""The KV pool is faulted in ahead of the blocks handed out, not all at start, and never changed."""

from __future__ import annotations

import torch

from hugepages import populate
from model import memory
from model.blocks import BlockManager


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    return 0


def test_the_high_water_mark_follows_the_highest_block_ever_handed_out():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.high_water == 0
    a = bm.allocate(3)
    assert sorted(a) == [0, 1, 2] and bm.high_water == 3  # lowest ids first
    bm.release(a)
    b = bm.allocate(2)  # freed blocks come back before new ones: the mark stays
    assert set(b) <= {0, 1, 2} and bm.high_water == 3
    bm.allocate(3)
    assert bm.high_water == 5


def test_the_prefaulter_faults_in_what_is_wanted_and_leaves_contents_alone():
    if not populate(torch.empty(4096, dtype=torch.uint8)):
        import pytest

        pytest.skip("the kernel has no MADV_POPULATE_WRITE")
    num_blocks, block = 64, 1 << 20  # 64 MiB per tensor
    tensors = [memory.empty((num_blocks, block), torch.uint8, torch.device("cpu")) for _ in range(2)]
    for t in tensors:  # a few bytes in the first block (one page) that must survive
        t[0, :16] = torch.arange(16, dtype=torch.uint8)
    before = _rss_bytes()
    pf = memory.Prefaulter(tensors, num_blocks)
    pf.want(16)
    assert pf.wait(timeout=30)
    grown = _rss_bytes() - before
    assert 2 * 14 << 20 <= grown < 2 * 40 << 20  # about 16 blocks of each tensor, not the 64
    pf.want(8)  # less than done: nothing to do
    assert pf.wait(timeout=1)
    pf.want(10_000)  # past the end: capped
    assert pf.wait(timeout=60)
    assert _rss_bytes() - before >= 2 * 60 << 20
    for t in tensors:
        assert t[0, :16].tolist() == list(range(16))

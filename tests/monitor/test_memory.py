"""memory.py: resident memory follows freed tensors inside `returning_freed_memory`, and not by default."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh process each time: the heap must not have grown before (see returning_freed_memory).
PROBE = """
import sys, torch
from parallel_yolo.monitor import memory
def held_after_free():
    torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # freeing a block this large raises glibc's threshold
    blocks, keep = [], []
    for _ in range(64):  # 64 MiB in 1 MiB tensors, each followed by a small one that stays
        blocks.append(torch.empty(2**20, dtype=torch.uint8).fill_(1))
        keep.append(torch.ones(1024, dtype=torch.uint8))
    before = memory.current_rss()
    del blocks
    return (before - memory.current_rss()) / 2**20
if sys.argv[1] == "inside":
    with memory.returning_freed_memory():
        print(held_after_free())
else:
    print(held_after_free())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_resident_set_only_when_asked():
    returned = {mode: float(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                           check=True).stdout.split()[-1])
                for mode in ("default", "inside")}
    assert returned["inside"] > 60, returned  # MiB given back of the 64 freed
    assert returned["default"] < 40, returned  # glibc keeps at least a third in its heap (0 or 32 MiB back here)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise")
def test_released_pages_leave_the_resident_set_and_read_as_zeros():
    import torch

    from parallel_yolo.monitor import memory

    buffer = torch.ones(16 * 2**20)  # 64 MiB
    before = memory.current_rss()
    memory.release_pages(buffer)
    assert (before - memory.current_rss()) / 2**20 > 60
    inner = buffer[4096:-4096]  # the partial pages at both ends are kept
    assert inner.abs().sum() == 0 and buffer.shape == (16 * 2**20,)
    buffer.fill_(2.0)
    assert (memory.current_rss() - before) / 2**20 > -4 and buffer.sum() == 2 * buffer.numel()

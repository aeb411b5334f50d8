"""hostd/memory.py: the heap an operation freed goes back to the system once hostd is idle."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from hostd import memory

MIB = 1 << 20


def needs_trim() -> None:
    if memory._malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim (glibc has)")


# In a fresh interpreter: glibc raises its own trim threshold as a long-running process
# frees big blocks (as the daemon does), after which free() keeps the heap; pinned here at
# 1 GiB so the run does not depend on what the process did before.
_RETAINED = """
import ctypes, gc, sys
from hostd import memory
ctypes.CDLL(None).mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
big, pins = [], []
for i in range(2400):  # 150 MiB of 64 KiB buffers: malloc's heap, not mmap
    big.append(bytes([i & 0xFF]) * (64 << 10))
    pins.append(bytes([i & 0xFF]) * 600)  # malloc'd too (pymalloc stops at 512)
del big
gc.collect()
freed = memory.rss_bytes()
t = memory._malloc_trim()
t(0)
print(freed, memory.rss_bytes(), len(pins))
"""


def test_a_trim_gives_back_the_heap_python_freed() -> None:
    """What a restore leaves behind: many mid-sized buffers freed, small objects still
    alive between them, and a heap free() does not shrink."""
    needs_trim()
    out = subprocess.run(
        [sys.executable, "-c", _RETAINED], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    freed, trimmed = int(out[0]), int(out[1])
    assert freed - trimmed > 64 * MIB, (freed >> 20, trimmed >> 20)


async def test_the_trim_waits_until_no_operation_runs() -> None:
    needs_trim()
    running = [True]
    t = memory.Trimmer(lambda: running[0], delay=0.01)
    try:
        t.ended()  # another operation still runs: nothing now; it ends with `ended` again
        await asyncio.sleep(0.05)
        assert t.trims == 0
        running[0] = False
        t.ended()
        t.ended()  # two ends in a row: one trim
        async with asyncio.timeout(10):
            while t.trims == 0:  # noqa: ASYNC110 - the trim runs in a thread
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert t.trims == 1
    finally:
        t.close()

"""hostd/memory.py: the heap an operation freed goes back to the system once hostd is idle."""

from __future__ import annotations

import asyncio
import gc

import pytest

from hostd import memory

MIB = 1 << 20


def needs_trim() -> None:
    if memory._malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim (glibc has)")


def test_a_trim_gives_back_the_heap_python_freed() -> None:
    """What a restore leaves behind: many mid-sized buffers freed, a few small objects still
    alive between them, so free() alone cannot shrink the heap."""
    needs_trim()
    big, pins = [], []
    for i in range(2400):  # 150 MiB of 64 KiB buffers (malloc's heap, not mmap)
        big.append(bytes([i & 0xFF]) * (64 << 10))
        pins.append(bytes([i & 0xFF]) * 600)  # malloc'd too (pymalloc stops at 512)
    del big
    gc.collect()
    freed = memory.rss_bytes()
    trim = memory._malloc_trim()
    assert trim is not None
    trim(0)
    assert freed - memory.rss_bytes() > 64 * MIB, (freed >> 20, memory.rss_bytes() >> 20)
    assert len(pins) == 2400


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

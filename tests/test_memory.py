"""hostd/memory.py: the heap an operation freed goes back to the system once hostd is idle."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Hostd

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
gone = memory.trim_heap()
print(freed, memory.rss_bytes(), gone, len(pins))
"""


def test_a_trim_gives_back_the_heap_python_freed() -> None:
    """What a restore leaves behind: many mid-sized buffers freed, small objects still
    alive between them, and a heap free() does not shrink."""
    needs_trim()
    out = subprocess.run(
        [sys.executable, "-c", _RETAINED], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    freed, trimmed, gone = int(out[0]), int(out[1]), int(out[2])
    assert freed - trimmed > 64 * MIB, (freed >> 20, trimmed >> 20)
    assert gone > 64 * MIB  # (what trim_heap says it gave back)


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


# A cold restore's buffers: a chunk's size each, allocated and freed on several threads.
_CHURN = """
import resource, sys, threading
from hostd import memory
tuned = memory.tune_malloc({} if sys.argv[1] == "tune" else {"MALLOC_TRIM_THRESHOLD_": "1"})
if sys.argv[1] == "trim-only":  # what setting the trim threshold alone does
    import ctypes
    ctypes.CDLL(None).mallopt(-1, 256 << 20)

def churn():
    for _ in range(100):
        b = bytearray(4 << 20)
        del b

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ts = [threading.Thread(target=churn) for _ in range(4)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tuned_malloc_reuses_a_restores_buffers() -> None:
    """400 buffers of 4 MiB (1024 pages each): reused from the arenas, they cost a few
    thousand page faults; faulted in afresh each time (the trim threshold set alone turns
    glibc's sliding mmap threshold off), ~400,000."""
    if memory._malloc_trim() is None:
        pytest.skip("this C library has no mallopt (glibc has)")

    def faults(how: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _CHURN, how], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        tuned, n = out.stdout.split()
        return tuned, int(n)

    assert faults("tune")[0] == "True"
    assert faults("tune")[1] < 20_000
    assert faults("trim-only")[1] > 200_000  # the measure tells the two apart
    # An operator's own malloc settings are left alone.
    assert not memory.tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not memory.tune_malloc({"MALLOC_ARENA_MAX": "8"})


# Threads that each hold a buffer at once, so each wants an arena of its own; then the heaps
# glibc made, from malloc_info's XML (one <heap nr=...> an arena).
_ARENAS = """
import ctypes, os, re, sys, tempfile, threading
from hostd import memory
if sys.argv[1] == "tune":
    assert memory.tune_malloc({})
hold = threading.Barrier(16)

def busy():
    b = bytearray(1 << 20)
    hold.wait()
    del b

ts = [threading.Thread(target=busy) for _ in range(16)]
for t in ts:
    t.start()
for t in ts:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = os.path.join(tempfile.mkdtemp(), "info.xml")
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(len(re.findall(r"<heap nr=", open(path).read())))
"""


def test_tuned_malloc_keeps_to_a_few_arenas() -> None:
    """16 threads allocating at once: glibc's default makes an arena for most of them (up
    to 8 per core), each keeping what was freed into it; tuned, at most ARENA_MAX."""
    if memory._malloc_trim() is None:
        pytest.skip("this C library has no mallopt (glibc has)")

    def arenas(how: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _ARENAS, how], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert arenas("tune") <= memory.ARENA_MAX
    assert arenas("default") > memory.ARENA_MAX  # the measure tells the two apart


def test_a_started_daemon_trims_what_its_load_freed_with_no_operation_asked(
    tmp_path: Path,
) -> None:
    """Loading a big index at start frees ~40 MiB of heap (a million blob rows read): given
    back IDLE_DELAY after the daemon is up, not only once a first restore or publish ends."""
    needs_trim()
    with Hostd(tmp_path / "h", origin=f"file://{tmp_path / 'origin'}") as d:
        deadline = time.monotonic() + 30
        while "memory: trimmed the heap" not in d.log():
            assert time.monotonic() < deadline, "no trim after the start:\n" + d.log()
            time.sleep(0.05)

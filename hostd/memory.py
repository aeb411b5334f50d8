"""Giving the heap an operation freed back to the system once the daemon is idle.

A restore or publish of 100,000 small files allocates a few hundred MiB of short-lived
objects (file bytes, a decoded manifest, per-blob maps) across several threads. Python
frees them, but glibc's malloc keeps most of that memory mapped in its arenas, so the
daemon's RSS stays at its peak for hours: 270-290 MiB after restores of 30,000 files that
need ~100 MiB at rest (bench/RESULTS.md). `malloc_trim(0)` returns the free pages of every
arena. It costs a walk over the heap (milliseconds), so it runs in a thread, once the last
operation has been over for IDLE_DELAY seconds. The one exception is `trim_heap`, which an
operation over TRIM_FILES files calls between its phases (~2 ms each): what one phase freed
would otherwise lie under the next one's peak. It also hands back the free buffers of a
restore running then, which its next chunks fault in afresh.

While an operation runs, the opposite: a cold restore allocates a buffer of a chunk's size
(4 MiB) per chunk fetched, on a dozen threads. glibc's defaults give each freed buffer back
to the system (its mmap threshold follows the sizes freed, then its trim threshold, twice
that, returns the top of an arena), and the next buffer is faulted in and zeroed afresh: ~9%
of the daemon's CPU in a cold restore. `tune_malloc` fixes both thresholds at start, so
buffers are reused from the arenas; the idle trim above still gives the memory back. It also
caps the arenas at ARENA_MAX: glibc makes up to 8 per core, one per thread that allocates
at once, and each keeps the buffers freed into it for the next allocation on its own
threads. A restore's buffers are allocated on the threads that receive them (a pool of
fetch_concurrency + upload_concurrency): with 16 arenas a cold GiB peaked at 274 MiB
against 173-185 with 4 (152-164 with 2), for the same time and CPU (bench/RESULTS.md); with
512 on a 64-core host, there would be no telling.

Where the C library has no malloc_trim or mallopt (musl), this does nothing. Both come from
the process's own libc handle (hostd.fileio.libc): no library search at start-up.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from hostd.fileio import libc

log = logging.getLogger(__name__)

IDLE_DELAY = 1.0  # seconds without an operation before the heap is trimmed
# An operation over this many files trims between its phases (`trim_heap`): a publish after
# its scan, every TRIM_FILES small files placed, before its entries and before its
# manifest; a manifest's decode once it is done.
# Each phase's garbage (~15-30 MB at 100,000 files) stayed resident under the next phase's
# peak until the idle trim (bench/RESULTS.md).
TRIM_FILES = 10_000
# mallopt's parameters (malloc.h) and what tune_malloc sets them to: allocations up to
# MMAP_THRESHOLD come from the arenas (every default chunk size; glibc's maximum), and an
# arena keeps up to TRIM_THRESHOLD free at its top until the idle trim.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
ARENA_MAX = 4
# Set in the environment, these are the operator's choice: tune_malloc leaves malloc alone.
MALLOC_VARIABLES = (
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
)


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Fix glibc's mmap and trim thresholds and cap its arenas (see the module's doc);
    whether it did."""
    if any(v in environ for v in MALLOC_VARIABLES):
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # (the mmap threshold first: setting either turns the sliding thresholds off)
    return (
        bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        and bool(mallopt(M_ARENA_MAX, ARENA_MAX))
    )


def _malloc_trim() -> Callable[[int], int] | None:
    fn: Any = getattr(libc, "malloc_trim", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn  # a ctypes call releases the GIL while it runs
    return trim


def trim_heap() -> int:
    """Give the free pages of the heap back now (blocking, milliseconds: a thread's), for an
    operation between its phases: what one phase freed would otherwise stay resident until
    the idle trim, under the next phase's peak. The bytes of RSS it gave back."""
    global _trim_now
    if _trim_now is None:
        _trim_now = _malloc_trim() or (lambda _pad: 0)
    before = rss_bytes()
    _trim_now(0)
    return max(before - rss_bytes(), 0)


_trim_now: Callable[[int], int] | None = None


def trim_for(files: int) -> None:
    """`trim_heap`, for an operation over `files` files: only from TRIM_FILES up (a smaller
    one's garbage is small, and it never pays for a trim). Blocking: a thread's."""
    if files >= TRIM_FILES:
        trim_heap()


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc says nothing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE")


class Trimmer:
    """Trims the heap IDLE_DELAY seconds after the last operation ended (`ended`), unless
    another started meanwhile (`busy`, read when the delay is over)."""

    def __init__(self, busy: Callable[[], bool], delay: float = IDLE_DELAY) -> None:
        self.busy = busy
        self.delay = delay
        self.trims = 0  # trims run
        self.released = 0  # bytes of RSS they gave back, in all
        self._trim = _malloc_trim()
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Trimmer(trims={self.trims}, released={self.released})"

    def ended(self) -> None:
        """An operation ended (on the loop): trim once the daemon has been idle a while."""
        if self._trim is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.delay, self._due)

    def _due(self) -> None:
        self._timer = None
        if self.busy() or (self._running is not None and not self._running.done()):
            return  # the operation that runs now ends with `ended` again
        self._running = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        trim = self._trim
        assert trim is not None
        before = rss_bytes()
        await asyncio.to_thread(trim, 0)
        gone = max(before - rss_bytes(), 0)
        self.trims += 1
        self.released += gone
        log.debug("memory: trimmed the heap, RSS %d MiB smaller", gone >> 20)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

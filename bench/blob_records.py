"""What a cached blob costs the cache in memory, and its hot calls in time.

    .venv/bin/python bench/blob_records.py [--blobs 1000000] [--trace]

A Cache with one tier (its index on /dev/shm) records N complete blobs with `adopt`
(in memory only, no files), each digest made fresh so the cache owns it as when it reads
the index at start. Prints the RSS growth per blob (with --trace: tracemalloc's, slower and
exact), then the time per call of `adopt`, `locate` and `touch` over a sample.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import blake3

from hostd.cache import Cache
from hostd.index import Index
from hostd.tier import BlobStat, Tier


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def digest(i: int) -> bytes:
    return blake3.blake3(i.to_bytes(8, "little")).digest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blobs", type=int, default=1_000_000)
    ap.add_argument("--trace", action="store_true", help="tracemalloc instead of RSS")
    args = ap.parse_args()
    n: int = args.blobs
    root = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        tier = Tier("mem", root / "mem", 1 << 50)
        ticks = iter(range(1 << 62))
        cache = Cache(
            [tier],
            Index(root / "index.db"),
            manifests_dir=root / "manifests",
            clock=lambda: float(next(ticks)),
        )
        cache.load()
        gc.collect()
        if args.trace:
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0] if args.trace else rss()
        t0 = time.perf_counter()
        for i in range(n):
            cache.adopt(tier, BlobStat(digest(i), 1000, 1, 1), 65536, persist=False)
        adopt = (time.perf_counter() - t0) / n
        gc.collect()
        grown = (tracemalloc.get_traced_memory()[0] if args.trace else rss()) - base
        tracemalloc.stop()
        how = "tracemalloc" if args.trace else "RSS"
        print(f"{n:,} blobs: {grown / n:.0f} bytes a blob ({how})")
        print(f"adopt  {adopt * 1e6:6.2f} us (a digest's hash included)")
        sample = [digest(i) for i in range(0, n, max(1, n // 20_000))]
        t0 = time.perf_counter()
        for d in sample:
            cache.locate(d)
        print(f"locate {(time.perf_counter() - t0) / len(sample) * 1e6:6.2f} us")
        t0 = time.perf_counter()
        cache.touch(sample)
        print(f"touch  {(time.perf_counter() - t0) / len(sample) * 1e6:6.2f} us")
        cache.index.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

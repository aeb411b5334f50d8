"""What a cold fill of many small files costs the event loop, a blob at a time (issue 11).

    .venv/bin/python bench/fill_loop.py [--files 10000] [--rounds 5] [--profile 25]

The event loop runs on one thread: whatever it spends on each blob bounds a small-file
restore on a host of any number of cores (the hashing, writing and copying around it run on
other threads and processes). This measures that share alone, in one process: the
small_files tree (N files of 1-16 KiB and 20 of 1 MiB) is published once by a real daemon
into a `file://` origin, then each round fills every blob into a fresh tier through the
daemon's own parts (Cache, Fetcher over local blobs and the origin, Filler with 16 workers,
its durability batches), announcing each blob as a restore's placer would hear of it. The
figure is the event loop thread's CPU time (`time.thread_time`) over the fill, per blob:
that of the other threads, and the machine's load, do not enter it, so it is steadier than
any wall time here. No placer and no target: a restore adds its per-blob announcement.

--profile N: one more round under cProfile (the loop thread only), its top N by own time.
Benchmarks are not tests: nothing here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_files as sf

from hostd.cache import Blob, Cache
from hostd.core.retry import RetryPolicy
from hostd.fetch import Fetcher
from hostd.fill import Filler, FillProgress, one_per_blob
from hostd.index import Index
from hostd.origin import Origin
from hostd.snapshots import decode_manifest
from hostd.sources import LocalBlobSource, OriginSource
from hostd.tier import Tier

WORKERS = 16  # the default fetch_concurrency


async def fill_once(root: Path, origin_url: str, manifest_bytes: bytes) -> tuple[float, float, int]:
    """One cold fill into a fresh tier under `root`: (loop CPU s, wall s, blobs)."""
    m = decode_manifest(manifest_bytes)
    entries = one_per_blob(m.files)
    tier = Tier("mem", root / "mem", 1 << 40)
    index = Index(root / "index.db")
    cache = Cache([tier], index, manifests_dir=root / "manifests", clock=time.time)
    cache.load()
    origin = Origin(origin_url, {}, concurrency=2 * WORKERS, retry=RetryPolicy(3, 0.1, 1.0))
    fetcher = Fetcher([LocalBlobSource(cache), OriginSource(origin)], WORKERS)
    filler = Filler(cache, fetcher, workers=WORKERS)
    heard: list[tuple[bytes, str, int, int]] = []

    def ready(digest: bytes, b: Blob) -> None:  # what a restore's placer is told of each
        heard.append((digest, b.tier.blob_file(digest), b.mtime_ns, b.mode))

    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        await filler.ensure(entries, m.chunk_size, [tier], FillProgress(), on_ready=ready)
        await filler.close()
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    finally:
        await fetcher.close()
        await origin.close()
        index.close()
    if len({d for d, *_ in heard}) != len(entries):
        raise SystemExit(f"{len(heard)} blobs announced, {len(entries)} filled")
    return cpu, wall, len(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--tmpfs-dir", default="/dev/shm")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fill-loop-", dir=args.tmpfs_dir))
    try:
        place = sf.Place(base, "self")
        sf.make_tree(base / "src", args.files)
        with place.daemon("pub") as d:
            sf.hostd_cli(d.socket, "publish", str(base / "src"), "--ref", sf.REF)
        manifests = list((base / "origin" / "manifests").iterdir())
        if len(manifests) != 1:
            raise SystemExit(f"expected one manifest at the origin, found {len(manifests)}")
        data = manifests[0].read_bytes()
        url = (base / "origin").as_uri()
        cpus, walls = [], []
        blobs = 0
        for r in range(args.rounds):
            root = base / f"round{r}"
            root.mkdir()
            cpu, wall, blobs = uvloop.run(fill_once(root, url, data))
            shutil.rmtree(root)
            cpus.append(cpu)
            walls.append(wall)
        cpu = statistics.median(cpus)
        print(
            f"{blobs:,} blobs: event loop {cpu * 1e3:.0f} ms CPU, {cpu / blobs * 1e6:.1f} us a "
            f"blob (rounds {', '.join(f'{c * 1e3:.0f}' for c in cpus)} ms); "
            f"fill wall {statistics.median(walls) * 1e3:.0f} ms"
        )
        if args.profile:
            root = base / "profiled"
            root.mkdir()
            prof = cProfile.Profile()
            prof.enable()
            uvloop.run(fill_once(root, url, data))
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

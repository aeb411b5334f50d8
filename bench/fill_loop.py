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
--warm: instead, the warm check a link restore by a non-writer makes, under read leases:
the tree filled once and every blob leased, then each round links every blob into a
directory and removes it (a client's rm: every ctime moves), checks the whole tree again
(Filler.ensure) and holds the leases again (Cache.lease), each timed as loop CPU a blob.
Benchmarks are not tests: nothing here fails on a timing. Record results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import small_files as sf

from hostd.cache import Blob, Cache
from hostd.core.manifest import FileEntry
from hostd.core.retry import RetryPolicy
from hostd.fetch import Fetcher
from hostd.fill import Filler, FillProgress, one_per_blob
from hostd.index import Index
from hostd.leases import Leases
from hostd.origin import Origin
from hostd.snapshots import decode_manifest
from hostd.sources import LocalBlobSource, OriginSource
from hostd.tier import Tier

WORKERS = 16  # the default fetch_concurrency


@dataclass
class Parts:
    """The daemon's parts a fill goes through, over a fresh tier under a root."""

    entries: list[FileEntry]
    chunk_size: int
    tier: Tier
    index: Index
    cache: Cache
    origin: Origin
    fetcher: Fetcher
    filler: Filler

    @classmethod
    def under(cls, root: Path, origin_url: str, manifest_bytes: bytes) -> Parts:
        m = decode_manifest(manifest_bytes)
        tier = Tier("mem", root / "mem", 1 << 40)
        index = Index(root / "index.db")
        cache = Cache([tier], index, manifests_dir=root / "manifests", clock=time.time)
        cache.load()
        origin = Origin(origin_url, {}, concurrency=2 * WORKERS, retry=RetryPolicy(3, 0.1, 1.0))
        fetcher = Fetcher([LocalBlobSource(cache), OriginSource(origin)], WORKERS)
        filler = Filler(cache, fetcher, workers=WORKERS)
        entries = one_per_blob(m.files)
        return cls(entries, m.chunk_size, tier, index, cache, origin, fetcher, filler)

    async def close(self) -> None:
        await self.fetcher.close()
        await self.origin.close()
        self.index.close()


async def fill_once(root: Path, origin_url: str, manifest_bytes: bytes) -> tuple[float, float, int]:
    """One cold fill into a fresh tier under `root`: (loop CPU s, wall s, blobs)."""
    p = Parts.under(root, origin_url, manifest_bytes)
    entries, tier, filler = p.entries, p.tier, p.filler
    heard: list[tuple[bytes, str, int, int]] = []

    def ready(digest: bytes, b: Blob) -> None:  # what a restore's placer is told of each
        heard.append((digest, b.tier.blob_file(digest), b.mtime_ns, b.mode))

    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        await filler.ensure(entries, p.chunk_size, [tier], FillProgress(), on_ready=ready)
        await filler.close()
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    finally:
        await p.close()
    if len({d for d, *_ in heard}) != len(entries):
        raise SystemExit(f"{len(heard)} blobs announced, {len(entries)} filled")
    return cpu, wall, len(entries)


async def warm_rounds(
    root: Path, origin_url: str, manifest_bytes: bytes, rounds: int
) -> tuple[list[tuple[float, float]], int]:
    """The tree filled once into a tier under `root`, its blobs leased; then per round, a
    link and an unlink of every blob, the check and the hold: [(check s, hold s)] of loop
    CPU, and the number of blobs."""
    p = Parts.under(root, origin_url, manifest_bytes)
    entries, tier, cache, filler = p.entries, p.tier, p.cache, p.filler
    leases = Leases(len(entries) + 1)
    cache.guard_links(leases)
    out = []
    try:
        where = await filler.ensure(entries, p.chunk_size, [tier], FillProgress())
        cache.lease(list(where.values()))
        for _ in range(rounds):
            links = root / "links"
            links.mkdir()
            for i, b in enumerate(where.values()):
                os.link(b.file, links / str(i))
            shutil.rmtree(links)
            c0 = time.thread_time()
            where = await filler.ensure(entries, p.chunk_size, [tier], FillProgress())
            c1 = time.thread_time()
            cache.lease(list(where.values()))  # (on the loop's thread here: timed alike)
            out.append((c1 - c0, time.thread_time() - c1))
        await filler.close()
    finally:
        leases.close()
        await p.close()
    return out, len(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--tmpfs-dir", default="/dev/shm")
    ap.add_argument("--warm", action="store_true")
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
        if args.warm:
            (base / "warm").mkdir()
            got, blobs = uvloop.run(warm_rounds(base / "warm", url, data, args.rounds))
            check = statistics.median(c for c, _ in got)
            hold = statistics.median(h for _, h in got)
            print(
                f"{blobs:,} blobs, warm under leases, each tree removed between rounds: the "
                f"check {check / blobs * 1e6:.1f} us a blob of loop CPU, the hold "
                f"{hold / blobs * 1e6:.1f} (rounds: "
                f"{', '.join(f'{c * 1e3:.0f}+{h * 1e3:.0f}' for c, h in got)} ms)"
            )
            return
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

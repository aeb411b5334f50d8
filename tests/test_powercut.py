"""A power cut in the middle of a fill: nothing the index records is lost or wrong.

A kill -9 cannot show a missing sync (the kernel still writes the page cache back), so the
tier here sits on an ext4 filesystem on a loop file, mounted with `commit=600` so that only
an explicit sync (syncfs, fsync) sends anything to its block device during the test. The
"power cut" is a copy of the loop's backing file taken in one synchronous stretch of the
event loop while the fill is stalled: it holds exactly what the filesystem had written to its
device, and none of what still sat dirty in the page cache. The "reboot" mounts that copy
(ext4 replays its journal). The index lives on another filesystem that the cut spares, as if
every commit were synced: the hardest case, rows survive and only blobs can be lost.

Then every blob the index recorded as complete must be on the rebooted tier, its size, mtime
and bytes those recorded, and a fill on the rebooted tier must finish without fetching any
of them again. The same run with a sync that does nothing (the control) must lose recorded
blobs: it shows the test can see the bug it is for.

Needs root, util-linux (losetup, mount), e2fsprogs (mkfs.ext4) and loop devices; skipped
with the reason where any is missing. (dm-flakey's drop_writes would do the same without the
copy, where the kernel has device-mapper.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from chunkfakes import DEADLINE, FakeSource, file_entry

from hostd.cache import Cache, blob_is_intact
from hostd.core import manifest as mf
from hostd.core.manifest import FileEntry
from hostd.durable import Durability
from hostd.fetch import Fetcher
from hostd.fill import Filler, FillProgress
from hostd.index import Index
from hostd.sources import LocalBlobSource
from hostd.tier import Tier

pytestmark = pytest.mark.root

CS = mf.MIN_CHUNK_SIZE
IMAGE_SIZE = 64 * 1024 * 1024
TOOLS = ("losetup", "mkfs.ext4", "mount", "umount", "cp")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: makes a loop device and mounts ext4 on it"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, e2fsprogs, coreutils)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices here (/dev/loop-control is missing)"
    return None


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


class Disk:
    """An ext4 filesystem on a loop file, mounted at `mnt`; `cut()` copies what its device
    holds, `reboot()` mounts such a copy instead."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.image = work / "disk.img"
        self.mnt = work / "mnt"
        self.loop: str | None = None

    def __repr__(self) -> str:
        return f"Disk({self.image}, loop={self.loop}, mounted at {self.mnt})"

    def make(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        # Inode tables and journal initialised now: no ext4lazyinit thread writes later.
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.image))
        self.mnt.mkdir()
        self.mount(self.image)

    def mount(self, image: Path) -> None:
        self.loop = sh("losetup", "--find", "--show", str(image))
        try:
            # commit=600: no periodic journal commit while the test runs; only a sync writes.
            sh("mount", "-t", "ext4", "-o", "commit=600", self.loop, str(self.mnt))
        except BaseException:
            self.detach()
            raise

    def cut(self) -> Path:
        """The device's contents now: what a power cut would leave (blocking)."""
        copy = self.work / f"cut-{time.monotonic_ns()}.img"
        sh("cp", "--sparse=always", str(self.image), str(copy))
        return copy

    def reboot(self, image: Path) -> None:
        self.unmount()
        self.mount(image)

    def unmount(self) -> None:
        if self.loop is None:
            return
        done = subprocess.run(["umount", str(self.mnt)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)
        self.detach()

    def detach(self) -> None:
        if self.loop is not None:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True, check=False)
            self.loop = None


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    d = Disk(tmp_path)
    try:
        d.make()
    except OSError as e:
        d.unmount()
        pytest.skip(f"cannot make an ext4 filesystem on a loop device here: {e}")
    try:
        yield d
    finally:
        d.unmount()


@dataclass
class Run:
    """A cache whose one tier is on the disk, its index beside the test (spared by the cut)."""

    tier: Tier
    index: Index
    cache: Cache
    origin: FakeSource
    filler: Filler
    durability: Durability

    def close(self) -> None:
        self.index.close()


def start(disk: Disk, state: Path, *, syncfs: bool, data: dict[bytes, bytes]) -> Run:
    tier = (
        Tier("disk", disk.mnt / "tier", 1 << 30)
        if syncfs
        else Tier("disk", disk.mnt / "tier", 1 << 30, syncfs=_no_sync, fsync_each=0)
    )
    index = Index(state / "index.db")
    cache = Cache([tier], index, manifests_dir=state / "manifests", clock=time.time)
    cache.load()
    origin = FakeSource("origin")
    origin.stored = dict(data)
    fetcher = Fetcher([LocalBlobSource(cache), origin], concurrency=4)
    # Count-triggered batches only, small ones: several are recorded before the cut.
    durability = Durability(cache, max_blobs=32, max_delay=3600)
    filler = Filler(cache, fetcher, workers=4, durability=durability)
    return Run(tier, index, cache, origin, filler, durability)


def _no_sync(_path: Path) -> None:
    """The control's syncfs: returns at once, having written nothing."""


def snapshot(files: int, seed: int) -> tuple[list[FileEntry], dict[bytes, bytes]]:
    """Small files of 1-4 KiB with past mtimes (one before 1970), and two of three chunks;
    the chunks' bytes by id."""
    rng = random.Random(seed)
    entries: list[FileEntry] = []
    chunks: dict[bytes, bytes] = {}
    for i in range(files):
        size = 3 * CS + 17 if i in (40, files - 40) else rng.randint(1024, 4096)
        data = rng.randbytes(size)
        mtime = -5_000_000_001 if i == 3 else 1_500_000_000 * 10**9 + rng.randrange(10**17)
        e = file_entry(f"d{i // 100}/f{i:04d}", data, CS, mtime=mtime)
        entries.append(e)
        for n, c in enumerate(e.chunks):
            chunks[c.id] = data[n * CS : n * CS + c.size]
    return entries, chunks


def recorded(index: Path) -> list[tuple[bytes, int, int, int]]:
    """(digest, size, mtime_ns, chunk_size) of each complete blob the index records."""
    db = sqlite3.connect(index)
    try:
        rows = db.execute(
            "SELECT digest, size, mtime_ns, chunk_size FROM blobs WHERE complete=1"
        ).fetchall()
    finally:
        db.close()
    return [(bytes(d), int(s), int(m), int(c)) for d, s, m, c in rows]


def lost_or_wrong(tier_root: Path, rows: list[tuple[bytes, int, int, int]]) -> list[str]:
    """Recorded blobs the rebooted tier does not hold as recorded."""
    bad = []
    for digest, size, mtime, chunk_size in rows:
        path = tier_root / "blobs" / digest.hex()[:2] / digest.hex()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            bad.append(f"{digest.hex()[:16]}: gone")
            continue
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            bad.append(f"{digest.hex()[:16]}: size/mtime {st.st_size}/{st.st_mtime_ns}")
            continue
        why = blob_is_intact(path, digest, size, chunk_size)
        if why is not None:
            bad.append(f"{digest.hex()[:16]}: {why}")
    return bad


async def fill_then_cut(disk: Disk, state: Path, *, syncfs: bool) -> tuple[Path, Path]:
    """Fill until batches are recorded and more blobs are written that wait for the next
    sync, the fill held at a gate; cut the power there. Returns the cut image and the index
    as it was at the cut."""
    entries, chunks = snapshot(300, seed=5)
    run = start(disk, state, syncfs=syncfs, data=chunks)
    recorded_upto, cut_at = 170, 185  # then 15 blobs wait (fewer than a batch: no sync)
    first, rest = asyncio.Event(), asyncio.Event()
    for i, e in enumerate(entries[recorded_upto:], recorded_upto):
        for c in e.chunks:
            run.origin.gates[c.id] = first if i < cut_at else rest
    job = asyncio.create_task(run.filler.ensure(entries, CS, [run.tier], FillProgress()))

    async def complete(upto: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while not all(  # noqa: ASYNC110 - polls the cache, which signals nothing
                run.cache.locate(e.digest) is not None for e in entries[:upto]
            ):
                await asyncio.sleep(0.01)

    try:
        await complete(recorded_upto)
        await run.durability.flush()
        assert run.durability.stats.syncs >= 2  # batches along the way, and this one
        first.set()
        await complete(cut_at)
        assert run.durability.pending == cut_at - recorded_upto
        assert not run.durability.syncing
        assert not job.done()
        # The cut: no await from here to the index copy, so nothing moves in between.
        image = disk.cut()
        at_cut = state / "index-at-cut.db"
        with contextlib.closing(sqlite3.connect(at_cut)) as dst:
            run.index.db.backup(dst)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        await run.filler.close()
        run.close()
    return image, at_cut


async def test_a_power_cut_loses_nothing_the_index_records(disk: Disk, tmp_path: Path) -> None:
    state = tmp_path / "state"
    image, at_cut = await fill_then_cut(disk, state, syncfs=True)
    rows = recorded(at_cut)
    assert len(rows) == 170

    disk.reboot(image)

    tier_root = disk.mnt / "tier"
    assert lost_or_wrong(tier_root, rows) == []
    # The next daemon, on the rebooted tier and the index as the cut left it, finishes the
    # fill: every byte right, nothing recorded fetched again.
    shutil.copy(at_cut, state / "index.db")
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{state / 'index.db'}{suffix}")
    entries, chunks = snapshot(300, seed=5)
    run = start(disk, state, syncfs=True, data=chunks)
    try:
        found = await run.filler.ensure(entries, CS, [run.tier], FillProgress())
        for e in entries:
            data = b"".join(chunks[c.id] for c in e.chunks)
            b = found[e.digest]
            assert b.path.read_bytes() == data, e.path
            assert os.stat(b.path).st_mtime_ns == e.mtime, e.path
        kept = {d for d, _, _, _ in rows}
        refetched = [
            e.path for e in entries if e.digest in kept and run.origin.calls[e.chunks[0].id]
        ]
        assert refetched == []
    finally:
        await run.filler.close()
        run.close()


async def test_the_control_without_a_sync_loses_recorded_blobs(disk: Disk, tmp_path: Path) -> None:
    """The same cut with a sync that writes nothing: rows outlive their blobs. If this ever
    passes with nothing lost, the test above proves nothing on this kernel."""
    image, at_cut = await fill_then_cut(disk, tmp_path / "state", syncfs=False)
    rows = recorded(at_cut)
    assert len(rows) == 170

    disk.reboot(image)

    assert lost_or_wrong(disk.mnt / "tier", rows) != []


async def crash_then_rehash_then_cut(disk: Disk, state: Path) -> tuple[Path, Path]:
    """A fill whose blobs are all named in the tier but none synced or recorded (the daemon
    killed before its batch's sync: only the page cache holds them); the next daemon's fill
    re-hashes each (no record vouches for them) and records them; the power is cut there.
    Returns the cut image and the index as it was at the cut."""
    entries, chunks = snapshot(120, seed=7)
    # A sync that writes nothing: what the kill leaves is in the page cache alone.
    run = start(disk, state, syncfs=False, data=chunks)
    # No batch is due before every blob is named.
    run.durability = Durability(run.cache, max_blobs=1 << 20, max_delay=3600)
    run.filler = Filler(
        run.cache,
        Fetcher([LocalBlobSource(run.cache), run.origin], concurrency=4),
        workers=4,
        durability=run.durability,
    )
    job = asyncio.create_task(run.filler.ensure(entries, CS, [run.tier], FillProgress()))
    try:
        async with asyncio.timeout(DEADLINE):
            while not all(  # noqa: ASYNC110 - polls the cache, which signals nothing
                run.cache.locate(e.digest) is not None for e in entries
            ):
                await asyncio.sleep(0.01)
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        run.close()
    # The kill came before any batch's rows: every blob is named in the tier, none recorded.
    with contextlib.closing(sqlite3.connect(state / "index.db")) as db, db:
        db.execute("DELETE FROM blobs")
    assert recorded(state / "index.db") == []

    run = start(disk, state, syncfs=True, data=chunks)
    try:
        found = await run.filler.ensure(entries, CS, [run.tier], FillProgress())
        assert len(found) == len({e.digest for e in entries})
        assert not any(run.origin.calls.values())  # all re-hashed in place, none fetched
        image = disk.cut()
        at_cut = state / "index-at-cut.db"
        with contextlib.closing(sqlite3.connect(at_cut)) as dst:
            run.index.db.backup(dst)
    finally:
        await run.filler.close()
        run.close()
    return image, at_cut


async def test_a_power_cut_after_a_crash_loses_nothing_a_rehash_recorded(
    disk: Disk, tmp_path: Path
) -> None:
    """Blobs a killed daemon named but never synced are re-hashed by the next one from the
    page cache, which vouches for nothing on the device: their rows wait for a sync too."""
    state = tmp_path / "state"
    image, at_cut = await crash_then_rehash_then_cut(disk, state)
    rows = recorded(at_cut)
    assert len(rows) == len({e.digest for e in snapshot(120, seed=7)[0]})

    disk.reboot(image)

    assert lost_or_wrong(disk.mnt / "tier", rows) == []

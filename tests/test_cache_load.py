"""Cache.load, streamed: each rule that reconciles the index with the tiers at start, and the
memory it takes (about what the view keeps, not a dict of rows and a list of stats besides).

Each test lays out tiers and index rows by hand (files written and rows put directly, no
daemon run before), opens a cache on them and checks the view, the rows left in the index
and which rows load wrote.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import blake3
import pytest

import hostd.cache
from hostd.cache import Cache
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id
from hostd.core.manifest import Chunk, FileEntry
from hostd.core.slots import DigestSlots
from hostd.index import BATCH, UNKNOWN_CTIME, BlobRow, Index
from hostd.tier import BLOB_MODE, BlobStat, Tier

CS = mf.MIN_CHUNK_SIZE
MTIME = 1_700_000_000_000_000_000
NOW = 5000.0


class WatchedIndex(Index):
    """An Index that notes which blob rows are written."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.written: list[bytes] = []

    def put_blob(self, row: BlobRow) -> None:
        self.written.append(row.digest)
        super().put_blob(row)

    def put_blobs(self, rows: Iterable[BlobRow]) -> None:
        rows = list(rows)
        self.written += [r.digest for r in rows]
        super().put_blobs(rows)


class Rig:
    """Tiers `mem` and `disk` and an index under one root, laid out by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tiers = {n: Tier(n, root / n, 1 << 40) for n in ("mem", "disk")}
        for t in self.tiers.values():
            t.prepare()
        self.index = Index(root / "index.db")
        self.opened: list[Index] = []

    def entry(self, name: str, size: int) -> tuple[FileEntry, bytes]:
        seed = blake3.blake3(name.encode()).digest()
        data = (seed * (size // len(seed) + 1))[:size]
        chunks = tuple(
            Chunk(chunk_id(data[o : o + CS]), len(data[o : o + CS])) for o in range(0, size, CS)
        )
        return FileEntry(name, 0o644, size, chunks, MTIME), data

    def blob(self, tier: str, name: str, size: int = 300) -> tuple[FileEntry, BlobStat]:
        """A complete blob file (no row)."""
        e, data = self.entry(name, size)
        t = self.tiers[tier]
        p = t.blob_path(e.digest)
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        os.utime(p, ns=(MTIME, MTIME))
        p.chmod(BLOB_MODE)
        return e, BlobStat.of(e.digest, os.stat(p))

    def partial(self, tier: str, name: str, chunks_written: int) -> FileEntry:
        """A partial blob file of three chunks, `chunks_written` of them written (no row)."""
        e, data = self.entry(name, 3 * CS)
        pb = self.tiers[tier].open_partial(e.digest, e.size, len(e.chunks))
        for i in range(chunks_written):
            pb.write(i, i * CS, data[i * CS : (i + 1) * CS])
        pb.close()
        return e

    def row(self, tier: str, digest: bytes, **values: object) -> BlobRow:
        r = BlobRow(digest, tier, 300, CS, True, 1, 10.0, 2, False)
        for k, v in values.items():
            setattr(r, k, v)
        self.index.put_blob(r)
        return r

    def snapshot(self, *entries: FileEntry) -> None:
        """A known snapshot naming `entries` (what gives an unsized blob its chunk size)."""
        cache = Cache(
            list(self.tiers.values()),
            self.index,
            manifests_dir=self.root / "manifests",
            clock=lambda: NOW,
        )
        cache.snaps.load()
        cache.record_snapshot(mf.build(chunk_size=CS, files=list(entries)))
        self.index.flush()

    def open(self) -> tuple[Cache, WatchedIndex]:
        self.index.close()
        index = WatchedIndex(self.root / "index.db")
        self.opened.append(index)
        cache = Cache(
            [Tier(n, t.root, t.budget) for n, t in self.tiers.items()],
            index,
            manifests_dir=self.root / "manifests",
            clock=lambda: NOW,
        )
        cache.load()
        index.flush()
        return cache, index

    def close(self) -> None:
        self.index.close()
        for index in self.opened:
            index.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def rows(index: Index) -> dict[tuple[bytes, str], BlobRow]:
    return {(r.digest, r.tier): r for r in index.blobs()}


def used(cache: Cache) -> dict[str, int]:
    return {u.name: u.used for u in cache.usage()}


def queued(cache: Cache) -> dict[str, int]:
    return {name: q.count for name, q in cache.queues.items()}


# -- complete blobs -------------------------------------------------------------------------------


def test_a_complete_blob_whose_row_agrees_keeps_the_recorded_stat_and_its_row(rig: Rig) -> None:
    e, st = rig.blob("mem", "a")
    # The row's stat, not today's: a blob written through while the daemon was down must
    # fail unchanged(); its lent mark and last use stay.
    want = rig.row("mem", e.digest, size=st.size, mtime_ns=7, ctime_ns=8, lent=True, last_used=3.0)

    cache, index = rig.open()

    b = cache.locate(e.digest)
    assert b is not None
    assert b.row() == want
    assert not cache.unchanged(b)
    assert index.written == []
    assert rows(index) == {(e.digest, "mem"): want}
    assert used(cache) == {"mem": st.size, "disk": 0}
    assert queued(cache) == {"mem": 1, "disk": 0}


@pytest.mark.parametrize(
    "disagree", [{"size": 299}, {"complete": False}], ids=["size", "partial-row"]
)
def test_a_complete_blob_whose_row_disagrees_is_rehashed_on_first_use(
    rig: Rig, disagree: dict[str, object]
) -> None:
    e, st = rig.blob("disk", "a")
    rig.row("disk", e.digest, lent=True, last_used=3.0, **disagree)

    cache, index = rig.open()

    b = cache.locate(e.digest)
    assert b is not None
    # the file's size and mtime, the row's use and chunk size, and no trust: never lent,
    # ctime unknown (the first use re-hashes it)
    want = BlobRow(e.digest, "disk", st.size, CS, True, st.mtime_ns, 3.0, UNKNOWN_CTIME, False)
    assert b.row() == want
    assert not cache.unchanged(b)
    assert index.written == [e.digest]
    assert rows(index) == {(e.digest, "disk"): want}
    assert used(cache) == {"mem": 0, "disk": st.size}


def test_a_complete_blob_with_no_row_is_recorded_untrusted_and_used_now(rig: Rig) -> None:
    e, st = rig.blob("mem", "a")

    cache, index = rig.open()

    b = cache.locate(e.digest)
    assert b is not None
    want = BlobRow(e.digest, "mem", st.size, 0, True, st.mtime_ns, NOW, UNKNOWN_CTIME, False)
    assert b.row() == want  # no manifest names it: no chunk size yet
    assert index.written == [e.digest]
    assert rows(index) == {(e.digest, "mem"): want}


@pytest.mark.parametrize("few", [True, False], ids=["few", "many"])
def test_unsized_blobs_get_their_chunk_size_from_a_known_snapshot(
    rig: Rig, few: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not few:  # as after a lost index: looked up in the columns, with no set of them
        monkeypatch.setattr(hostd.cache, "_FEW_UNSIZED", 0)
    named, _ = rig.blob("mem", "named")  # no row
    kept, st_kept = rig.blob("disk", "kept")  # a row that agrees, but with no chunk size
    rig.row(
        "disk",
        kept.digest,
        size=st_kept.size,
        chunk_size=0,
        mtime_ns=st_kept.mtime_ns,
        ctime_ns=st_kept.ctime_ns,
    )
    stray, _ = rig.blob("mem", "stray")  # named by no snapshot
    rig.snapshot(named, kept)

    cache, index = rig.open()

    assert [b.chunk_size for b in cache.copies(named.digest)] == [CS]
    assert [b.chunk_size for b in cache.copies(kept.digest)] == [CS]
    assert [b.chunk_size for b in cache.copies(stray.digest)] == [0]
    got = rows(index)
    assert got[(named.digest, "mem")].chunk_size == CS
    assert got[(kept.digest, "disk")] == BlobRow(
        kept.digest, "disk", st_kept.size, CS, True, st_kept.mtime_ns, 10.0, st_kept.ctime_ns
    )
    assert got[(stray.digest, "mem")].chunk_size == 0
    assert sorted(index.written) == sorted([named.digest, kept.digest, stray.digest])
    b = cache.locate(kept.digest)
    assert b is not None
    assert cache.unchanged(b)  # its recorded stat kept: still trusted


# -- partial blobs --------------------------------------------------------------------------------


def test_a_partial_with_a_usable_row_is_resumable_charged_what_it_holds(rig: Rig) -> None:
    e = rig.partial("disk", "p", chunks_written=1)
    want = rig.row("disk", e.digest, size=e.size, complete=False, mtime_ns=0, last_used=4.0)
    path = rig.tiers["disk"].partial_path(e.digest)
    held = min(e.size, os.stat(path).st_blocks * 512)

    cache, index = rig.open()

    b = cache.partial(e.digest)
    assert b is not None
    assert (b.complete, b.size, b.chunk_size, b.last_used, b.charged) == (
        False,
        e.size,
        CS,
        4.0,
        held,
    )
    assert path.exists()
    assert used(cache) == {"mem": 0, "disk": held}
    assert queued(cache) == {"mem": 0, "disk": 1}  # evictable: no fill uses it
    assert index.written == []  # in memory only
    assert rows(index) == {(e.digest, "disk"): want}


@pytest.mark.parametrize(
    "row",
    [None, {"complete": True}, {"size": 3 * CS + 1}, {"chunk_size": 0}],
    ids=["no-row", "complete-row", "other-size", "no-chunk-size"],
)
def test_a_partial_without_a_usable_row_is_removed_with_its_row(
    rig: Rig, row: dict[str, object] | None
) -> None:
    e = rig.partial("mem", "p", chunks_written=1)
    if row is not None:
        rig.row("mem", e.digest, **({"size": e.size, "complete": False} | row))

    cache, index = rig.open()

    assert cache.copies(e.digest) == []
    assert os.listdir(rig.tiers["mem"].partial_dir) == []
    assert rows(index) == {}
    assert used(cache) == {"mem": 0, "disk": 0}


def test_a_partial_beside_the_complete_blob_is_removed_and_the_blob_kept(rig: Rig) -> None:
    e, st = rig.blob("mem", "a", 3 * CS)
    want = rig.row("mem", e.digest, size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns)
    pb = rig.tiers["mem"].open_partial(e.digest, e.size, len(e.chunks))
    pb.close()

    cache, index = rig.open()

    assert [(b.complete, b.row()) for b in cache.copies(e.digest)] == [(True, want)]
    assert os.listdir(rig.tiers["mem"].partial_dir) == []
    assert index.written == []
    assert used(cache) == {"mem": st.size, "disk": 0}


# -- rows with no file ----------------------------------------------------------------------------


def test_rows_whose_file_is_gone_are_deleted(rig: Rig) -> None:
    e, st = rig.blob("mem", "kept")
    rig.row("mem", e.digest, size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns)
    rig.row("disk", e.digest)  # a copy deleted behind the index
    gone = [blake3.blake3(b"%d" % i).digest() for i in range(2 * BATCH + 5)]  # a few batches
    rig.index.put_blobs(BlobRow(d, "mem", 10, CS, True, 1, 1.0) for d in gone[::2])
    rig.index.put_blobs(BlobRow(d, "disk", 10, CS, False, 0, 1.0) for d in gone[1::2])
    rig.row("tape", e.digest)  # a tier no longer configured
    rig.row("mem", b"short")  # not a digest

    cache, index = rig.open()

    assert [b.tier.name for b in cache.copies(e.digest)] == ["mem"]
    assert all(cache.copies(d) == [] for d in gone)
    assert list(rows(index)) == [(e.digest, "mem")]
    assert index.written == []
    assert used(cache) == {"mem": st.size, "disk": 0}
    assert queued(cache) == {"mem": 1, "disk": 0}
    assert [len(cache.digests(t)) for t in cache.tiers] == [1, 0]


def test_a_lost_index_is_rebuilt_from_the_tiers(rig: Rig) -> None:
    found = [rig.blob(t, f"{t}{i}")[1] for t in ("mem", "disk") for i in range(5)]
    rig.partial("disk", "p", chunks_written=2)

    cache, index = rig.open()

    got = rows(index)
    assert len(got) == len(found) == len(index.written)
    for st in found:
        (b,) = cache.copies(st.digest)
        assert got[(st.digest, b.tier.name)] == b.row()
        assert (b.size, b.mtime_ns, b.ctime_ns, b.last_used) == (
            st.size,
            st.mtime_ns,
            UNKNOWN_CTIME,
            NOW,
        )
    assert os.listdir(rig.tiers["disk"].partial_dir) == []
    assert used(cache) == {"mem": 5 * 300, "disk": 5 * 300}


# -- memory ---------------------------------------------------------------------------------------

LOAD_BLOBS = 30_000
# What load may hold at its peak per blob: the view itself keeps ~140 bytes a blob (columns,
# slot map, queue); a dict of every row and a list of every stat beside it came to ~670.
PEAK_PER_BLOB = 300


def test_load_holds_little_more_than_the_view_it_builds(rig: Rig) -> None:
    mem = rig.tiers["mem"]
    recorded: list[BlobRow] = []
    for i in range(LOAD_BLOBS):
        d = blake3.blake3(i.to_bytes(8, "little")).digest()
        p = mem.blob_file(d)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o444)
        except FileNotFoundError:
            os.mkdir(os.path.dirname(p))
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o444)
        os.close(fd)
        st = os.stat(p)
        recorded.append(BlobRow(d, "mem", 0, CS, True, st.st_mtime_ns, i, st.st_ctime_ns))
    rig.index.put_blobs(recorded)
    del recorded

    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        cache, index = rig.open()
        took = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(cache.digests(cache.tiers[0])) == LOAD_BLOBS
    assert index.written == []
    assert peak / LOAD_BLOBS < PEAK_PER_BLOB, f"{peak / LOAD_BLOBS:.0f} bytes a blob"
    assert took < 60  # tracemalloc slows it several times; without, ~20 us a blob


# -- the parts load streams through ---------------------------------------------------------------


def test_the_scan_skips_names_that_are_not_ids_and_files_that_vanish(rig: Rig) -> None:
    mem = rig.tiers["mem"]
    e, st = rig.blob("mem", "a")
    sub = mem.blob_path(e.digest).parent
    for stray in (e.digest.hex().upper(), e.digest.hex()[:-1], " " + e.digest.hex()[1:]):
        (sub / stray).write_bytes(b"x")
    (mem.blobs_dir / "stray-file").write_bytes(b"x")
    (mem.partial_dir / f"{e.digest.hex()}.have").write_bytes(b"x")

    assert [found for batch in mem.complete_blobs() for found in batch] == [
        (e.digest, (st.size, st.mtime_ns, st.ctime_ns, mem.blob_path(e.digest).stat().st_mode))
    ]
    assert mem.partial_blobs() == []
    assert mem.scan() == ([st], [])


def test_digest_slots_put_finds_a_present_key_and_adds_an_absent_one() -> None:
    slots = DigestSlots(32)
    a, b, c = (blake3.blake3(x).digest() for x in (b"a", b"b", b"c"))
    sa = slots.put(a)
    assert (slots.put(a), len(slots)) == (sa, 1)
    sb = slots.add(b)
    slots.remove(sa)
    assert slots.put(c) == sa  # the freed slot, given out again
    assert (slots.find(a), slots.find(b), slots.find(c)) == (-1, sb, sa)
    assert (slots.put(b), len(slots)) == (sb, 2)

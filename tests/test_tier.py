"""Tier: one cache directory. Sparse fill out of order, presence written after data, atomic
read-only completion, resume after a restart with present chunks re-hashed, scan at start,
scratch sweep, copy_in. All synchronous (the tier is blocking I/O by design)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from hostd import tier as tier_module
from hostd.core.ids import chunk_id, file_digest
from hostd.core.manifest import Chunk
from hostd.errors import TierError
from hostd.tier import BLOB_MODE, SYNCFS, BlobCopyCorrupt, Tier, digest_of

CS = 64 * 1024
# Three full chunks and a short last one; each chunk's bytes differ.
DATA = b"".join(bytes([i + 1]) * CS for i in range(3)) + b"\x07" * 1000
CHUNKS = tuple(
    Chunk(chunk_id(DATA[o : o + CS]), len(DATA[o : o + CS])) for o in range(0, len(DATA), CS)
)
DIGEST = bytes.fromhex("ab" * 32)
REAL = file_digest((c.id, c.size) for c in CHUNKS)  # DATA's true digest
OTHER = bytes.fromhex("cd" * 32)


def make_tier(root: Path, name: str = "disk") -> Tier:
    t = Tier(name, root / name, budget=1 << 30)
    t.prepare()
    return t


def piece(i: int) -> bytes:
    return DATA[i * CS : i * CS + CHUNKS[i].size]


@pytest.fixture
def tier(tmp_path: Path) -> Tier:
    return make_tier(tmp_path)


def test_fill_out_of_order_then_complete(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    assert not pb.resumed
    assert pb.missing() == [0, 1, 2, 3]
    assert os.stat(pb.path).st_size == len(DATA)  # sparse, full length from the start
    for i in (3, 1, 0, 2):
        assert not pb.full
        pb.write(i, i * CS, piece(i))
    assert pb.full
    assert pb.missing() == []
    assert pb.read(CS, 10) == piece(1)[:10]
    partial, have = pb.path, pb.have_path

    st = pb.complete()

    dest = tier.blob_path(DIGEST)
    assert dest == tier.blobs_dir / DIGEST.hex()[:2] / DIGEST.hex()
    assert dest.read_bytes() == DATA
    info = os.stat(dest)
    assert stat.S_IMODE(info.st_mode) == BLOB_MODE == 0o444
    assert (st.digest, st.size, st.mtime_ns) == (DIGEST, len(DATA), info.st_mtime_ns)
    assert not partial.exists()
    assert not have.exists()
    assert tier.stat_blob(DIGEST) == st
    assert tier.stat_blob(OTHER) is None


def test_presence_file_tracks_written_chunks(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    pb.write(2, 2 * CS, piece(2))
    assert pb.have_path.read_bytes() == b"\x00\x00\x01\x00"
    pb.close()
    pb.close()  # idempotent


def test_reopen_after_restart_resumes_with_only_missing_chunks(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    pb.write(0, 0, piece(0))
    pb.write(3, 3 * CS, piece(3))
    pb.close()  # the process "dies" here

    again = Tier(tier.name, tier.root, tier.budget)  # a new run: a fresh Tier on the same dir
    again.prepare()
    pb2 = again.open_partial(DIGEST, len(DATA), len(CHUNKS))
    assert pb2.resumed
    assert pb2.missing() == [1, 2]
    assert pb2.recheck(CHUNKS, CS) == 0
    assert pb2.missing() == [1, 2]
    for i in pb2.missing():
        pb2.write(i, i * CS, piece(i))
    pb2.complete()
    assert again.blob_path(DIGEST).read_bytes() == DATA


def test_reopen_with_nothing_present_is_not_resumed(tier: Tier) -> None:
    tier.open_partial(DIGEST, len(DATA), len(CHUNKS)).close()
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    assert not pb.resumed
    assert pb.missing() == [0, 1, 2, 3]
    pb.close()


def test_leftover_that_does_not_fit_starts_over(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    pb.write(0, 0, piece(0))
    pb.close()
    # Same name, other geometry (a leftover of something else): nothing is trusted.
    pb2 = tier.open_partial(DIGEST, len(DATA) - 1000, 3)
    assert not pb2.resumed
    assert pb2.missing() == [0, 1, 2]
    assert os.stat(pb2.path).st_size == len(DATA) - 1000
    assert pb2.read(0, 16) == b"\x00" * 16
    pb2.close()


def test_recheck_catches_a_present_chunk_corrupted_on_disk(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    for i in range(len(CHUNKS)):
        pb.write(i, i * CS, piece(i))
    pb.close()
    # Flip a byte of chunk 1 behind the tier's back (a torn write, a bad disk).
    with open(pb.path, "r+b") as f:
        f.seek(CS + 100)
        f.write(b"\xff")

    pb2 = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    assert pb2.resumed
    assert pb2.missing() == []
    assert pb2.recheck(CHUNKS, CS) == 1
    assert pb2.missing() == [1]
    assert pb2.have_path.read_bytes() == b"\x01\x00\x01\x01"  # cleared on disk too
    with pytest.raises(TierError, match="not full"):
        pb2.complete()
    pb2.write(1, CS, piece(1))
    pb2.complete()
    assert tier.blob_path(DIGEST).read_bytes() == DATA


def test_complete_refuses_a_blob_that_is_not_full(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    pb.write(0, 0, piece(0))
    with pytest.raises(TierError, match=rf"blob {DIGEST.hex()} is not full"):
        pb.complete()
    assert not tier.blob_path(DIGEST).exists()
    assert pb.path.exists()
    assert pb.have_path.exists()
    pb.discard()
    assert not pb.path.exists()
    assert not pb.have_path.exists()


def test_scan_finds_complete_and_partial_blobs_and_ignores_junk(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    for i in range(len(CHUNKS)):
        pb.write(i, i * CS, piece(i))
    done = pb.complete()
    part = tier.open_partial(OTHER, 5000, 1)
    part.write(0, 0, b"z" * 10)
    part.close()
    # Junk a human or another tool might leave: none of it is a blob.
    (tier.blobs_dir / "ab" / "not-a-digest").write_bytes(b"x")
    (tier.blobs_dir / "ab" / ("AB" * 32)).write_bytes(b"x")  # upper case is not our id
    (tier.blobs_dir / "zz").mkdir()
    (tier.blobs_dir / "zz" / ("ef" * 31)).write_bytes(b"x")  # 62 digits
    (tier.blobs_dir / "README").write_text("a file where a fan-out dir would be")
    (tier.partial_dir / "notes.txt").write_text("junk")
    (tier.partial_dir / (OTHER.hex() + ".tmp")).write_bytes(b"junk")

    complete, partial = tier.scan()

    assert complete == [done]
    assert [(p.digest, p.size) for p in partial] == [(OTHER, 5000)]


def test_scan_of_a_tier_never_prepared_is_empty(tmp_path: Path) -> None:
    t = Tier("mem", tmp_path / "nothing-here", budget=100)
    assert t.scan() == ([], [])


def test_prepare_sweeps_tmp_leftovers_and_keeps_blobs(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    for i in range(len(CHUNKS)):
        pb.write(i, i * CS, piece(i))
    pb.complete()
    part = tier.open_partial(OTHER, 10, 1)
    part.close()
    stray = tier.partial_dir / f"{'ab' * 32}.have"  # a blob installed just before a kill
    stray.write_bytes(b"\x01")
    (tier.tmp_dir / "publish.123.blob").write_bytes(b"half a file")
    os.chmod(tier.tmp_dir / "publish.123.blob", 0o444)
    (tier.tmp_dir / "scratch").mkdir()
    (tier.tmp_dir / "scratch" / "inner").write_bytes(b"x")
    os.symlink("/etc/passwd", tier.tmp_dir / "link")

    tier.prepare()

    assert list(tier.tmp_dir.iterdir()) == []
    assert Path("/etc/passwd").exists()  # the link went, not its target
    assert tier.blob_path(DIGEST).read_bytes() == DATA
    assert part.path.exists()  # partial blobs are resumable, not scratch
    assert part.have_path.exists()
    assert not stray.exists()


def test_prepare_names_the_tier_when_it_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    t = Tier("mem", blocker / "tier", budget=100)
    with pytest.raises(TierError, match=r"tier 'mem' .*preparing the tier failed"):
        t.prepare()


def complete_in(t: Tier, digest: bytes = REAL) -> Path:
    pb = t.open_partial(digest, len(DATA), len(CHUNKS))
    for i in range(len(CHUNKS)):
        pb.write(i, i * CS, piece(i))
    pb.complete()
    return t.blob_path(digest)


def test_copy_in_makes_a_read_only_copy_and_leaves_no_scratch(tmp_path: Path) -> None:
    mem, disk = make_tier(tmp_path, "mem"), make_tier(tmp_path, "disk")
    src = complete_in(disk)

    st = mem.copy_in(src, REAL, len(DATA), CS)

    dest = mem.blob_path(REAL)
    assert dest.read_bytes() == DATA
    assert stat.S_IMODE(os.stat(dest).st_mode) == BLOB_MODE
    assert (st.digest, st.size) == (REAL, len(DATA))
    assert st == mem.stat_blob(REAL)
    assert st.ctime_ns == os.stat(dest).st_ctime_ns
    assert list(mem.tmp_dir.iterdir()) == []
    assert src.read_bytes() == DATA  # the source stays
    assert not os.path.samefile(dest, src)  # a copy, not a link


def test_copy_in_of_a_missing_source_raises_tier_error_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    mem = make_tier(tmp_path, "mem")
    with pytest.raises(TierError, match=r"tier 'mem'.*copying a blob in failed"):
        mem.copy_in(tmp_path / "no-such-blob", REAL, len(DATA), CS)
    assert list(mem.tmp_dir.iterdir()) == []
    assert mem.stat_blob(REAL) is None


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("evil", "content does not match its digest"),
        ("grow", f"size {len(DATA) + 4}, want {len(DATA)}"),
    ],
)
def test_copy_in_hashes_the_copy_and_installs_nothing_that_does_not_match(
    tmp_path: Path, damage: str, why: str
) -> None:
    """A source written through since it was verified (a hardlinked blob, its mtime set
    back) is not laundered into a fresh copy with a fresh stat."""
    mem, disk = make_tier(tmp_path, "mem"), make_tier(tmp_path, "disk")
    src = complete_in(disk)
    old = os.stat(src)
    os.chmod(src, 0o644)
    with open(src, "ab" if damage == "grow" else "r+b") as f:
        f.write(b"EVIL")
    os.chmod(src, BLOB_MODE)
    os.utime(src, ns=(old.st_atime_ns, old.st_mtime_ns))

    with pytest.raises(BlobCopyCorrupt) as info:
        mem.copy_in(src, REAL, len(DATA), CS)

    assert info.value.why == why
    assert mem.stat_blob(REAL) is None
    assert list(mem.tmp_dir.iterdir()) == []


def test_remove_blob_and_partial_are_idempotent(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, 10, 1)
    pb.write(0, 0, b"0123456789")
    pb.complete()
    tier.open_partial(OTHER, 10, 1).close()
    tier.remove_blob(DIGEST)
    tier.remove_blob(DIGEST)
    tier.remove_partial(OTHER)
    tier.remove_partial(OTHER)
    assert tier.scan() == ([], [])
    assert list(tier.partial_dir.iterdir()) == []


def test_write_after_close_is_a_tier_error_not_a_stray_fd(tier: Tier) -> None:
    pb = tier.open_partial(b"\x05" * 32, 10, 1)
    pb.close()
    with pytest.raises(TierError, match="closed"):
        pb.write(0, 0, b"0123456789")


def test_close_waits_for_a_write_in_progress(tier: Tier) -> None:
    """A fill cancelled mid-write closes its blob from another thread: the write finishes whole
    (or is refused) and never lands on a descriptor number reused by another file."""
    size = 256 * 1024 * 1024
    pb = tier.open_partial(b"\x06" * 32, size, 1)
    data = memoryview(bytearray(b"\x07" * size))
    started = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        started.set()
        try:
            pb.write(0, 0, data)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(5)
    pb.close()  # returns only once no write is running
    t.join(10)
    assert pb.fd == -1
    if errors:
        assert all(isinstance(e, TierError) for e in errors), errors
    else:
        with open(pb.path, "rb") as f:
            assert f.read(16) == b"\x07" * 16
        assert pb.have[0] == 1


# -- mtimes and durability ---------------------------------------------------------------------

MTIME = 1_600_000_000_123_456_789  # 2020-09-13, nanoseconds included
BEFORE_1970 = -86_400_000_000_001  # 1969-12-31, a nanosecond before a whole second


class FsyncCount:
    """Counts os.fsync calls (monkeypatched in), passing them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fds: list[int] = []
        real = os.fsync

        def counted(fd: int) -> None:
            self.fds.append(fd)
            real(fd)

        monkeypatch.setattr(os, "fsync", counted)


@pytest.mark.parametrize("mtime", [MTIME, BEFORE_1970, 0])
def test_write_whole_gives_the_blob_its_mtime_before_the_stat_it_returns(
    tier: Tier, mtime: int
) -> None:
    st = tier.write_whole(REAL, DATA, mtime)
    info = os.stat(tier.blob_path(REAL))
    assert info.st_mtime_ns == st.mtime_ns == mtime
    assert st.ctime_ns == info.st_ctime_ns  # the stat is the last word: nothing moved it since
    assert stat.S_IMODE(info.st_mode) == BLOB_MODE


def test_complete_gives_the_blob_its_mtime(tier: Tier) -> None:
    pb = tier.open_partial(DIGEST, len(DATA), len(CHUNKS))
    for i in range(len(CHUNKS)):
        pb.write(i, i * CS, piece(i))
    st = pb.complete(BEFORE_1970, durable=False)
    assert os.stat(tier.blob_path(DIGEST)).st_mtime_ns == st.mtime_ns == BEFORE_1970
    assert tier.stat_blob(DIGEST) == st


def test_no_mtime_keeps_the_write_time(tier: Tier) -> None:
    """A format-1 entry records no mtime: the blob keeps the time it was written at."""
    before = os.stat(tier.root).st_mtime_ns - 10**9
    st = tier.write_whole(REAL, DATA, None)
    assert st.mtime_ns >= before


def test_copy_in_keeps_the_source_mtime(tmp_path: Path) -> None:
    mem, disk = make_tier(tmp_path, "mem"), make_tier(tmp_path, "disk")
    disk.write_whole(REAL, DATA, BEFORE_1970)
    st = mem.copy_in(disk.blob_path(REAL), REAL, len(DATA), CS, durable=False)
    assert os.stat(mem.blob_path(REAL)).st_mtime_ns == st.mtime_ns == BEFORE_1970
    assert st == mem.stat_blob(REAL)


def test_an_unrepresentable_mtime_leaves_the_write_time(
    tier: Tier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that cannot hold the time (EINVAL, EOVERFLOW) is no failure: the blob keeps
    its write time, and the files that wanted the other time get copies."""

    def refuse(*_a: object, **_k: object) -> None:
        raise OSError(errno.EOVERFLOW, "Value too large")

    monkeypatch.setattr(os, "utime", refuse)
    st = tier.write_whole(REAL, DATA, MTIME)
    assert st.mtime_ns != MTIME
    assert tier.blob_path(REAL).read_bytes() == DATA


@pytest.mark.parametrize("durable", [True, False])
def test_durable_fsyncs_each_blob_and_not_durable_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    mem, disk = make_tier(tmp_path, "mem"), make_tier(tmp_path, "disk")
    fsyncs = FsyncCount(monkeypatch)
    disk.write_whole(REAL, DATA, MTIME, durable=durable)
    pb = disk.open_partial(DIGEST, len(DATA), len(CHUNKS))
    for i in range(len(CHUNKS)):
        pb.write(i, i * CS, piece(i))
    pb.complete(MTIME, durable=durable)
    mem.copy_in(disk.blob_path(REAL), REAL, len(DATA), CS, durable=durable)
    assert len(fsyncs.fds) == (3 if durable else 0)


def test_sync_is_one_syncfs_of_the_tier(tier: Tier, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def syncfs(path: Path) -> None:
        calls.append(path)
        assert path == tier.blobs_dir

    t = Tier(tier.name, tier.root, tier.budget, syncfs=syncfs)
    fsyncs = FsyncCount(monkeypatch)
    digests = [bytes([i]) * 32 for i in range(20)]
    for d in digests:
        t.write_whole(d, b"x", MTIME, durable=False)
    t.sync(digests)
    assert len(calls) == 1
    assert fsyncs.fds == []
    t.sync(digests, each=True)  # after a failed sync: the blobs one by one as well
    assert len(calls) == 2
    assert len(fsyncs.fds) == 20 + 1 + len({d.hex()[:2] for d in digests})  # + blobs/ + prefixes


def test_the_real_syncfs_runs_where_libc_has_it(tier: Tier) -> None:
    if SYNCFS is None:
        pytest.skip("this libc has no syncfs: Tier.sync fsyncs each blob instead")
    tier.write_whole(REAL, DATA, MTIME, durable=False)
    tier.sync([REAL])


def test_without_syncfs_each_blob_and_its_directory_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = Tier("disk", tmp_path / "disk", 1 << 30, syncfs=None)
    t.prepare()
    t.write_whole(REAL, DATA, MTIME, durable=False)
    fsyncs = FsyncCount(monkeypatch)
    t.sync([REAL, OTHER])  # OTHER was evicted meanwhile: skipped
    assert len(fsyncs.fds) == 3  # the blob, its prefix directory, blobs/


def test_a_failed_sync_is_a_tier_error_naming_the_tier(tmp_path: Path) -> None:
    def failing(_path: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    t = Tier("disk", tmp_path / "disk", 1 << 30, syncfs=failing, fsync_each=0)
    t.prepare()
    t.write_whole(REAL, DATA, MTIME, durable=False)
    with pytest.raises(TierError, match=r"tier 'disk' .*syncing its blobs to disk failed"):
        t.sync([REAL])


def test_install_makes_the_prefix_directory_only_when_missing(tier: Tier) -> None:
    a = bytes.fromhex("01" * 32)
    b = bytes.fromhex("01" + "02" * 31)  # same prefix
    tier.write_whole(a, b"a")
    assert tier.blob_path(a).parent.is_dir()
    tier.write_whole(b, b"b")
    assert tier.blob_path(b).read_bytes() == b"b"
    scratch = tier.tmp_dir / "gone"
    with pytest.raises(FileNotFoundError):
        tier.install(scratch, bytes.fromhex("03" * 32))  # no scratch: not a missing prefix
    assert not tier.blob_path(bytes.fromhex("03" * 32)).parent.exists()


def test_a_few_blobs_are_fsynced_each_not_their_filesystem(
    tier: Tier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big files' blobs land a few at a time: syncing one fsyncs it (and the directories it
    was renamed into), leaving the rest of the filesystem's dirty data (the restore's own
    copies on it, other programs' files) to the kernel. A larger batch is one syncfs."""
    calls: list[Path] = []
    t = Tier(tier.name, tier.root, tier.budget, syncfs=calls.append, fsync_each=2)
    fsyncs = FsyncCount(monkeypatch)
    digests = [bytes([i]) * 32 for i in range(3)]
    for d in digests:
        t.write_whole(d, b"x", MTIME, durable=False)
    t.sync(digests[:2])
    assert calls == []
    assert len(fsyncs.fds) == 2 + 1 + 2  # the blobs, blobs/, their two prefix directories
    t.sync(digests)
    assert calls == [t.blobs_dir]
    assert len(fsyncs.fds) == 5


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_a_digest_hashed_on_several_threads_is_the_file_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(tier_module, "HASH_THREADS", threads)
    monkeypatch.setattr(tier_module, "HASH_PARALLEL_MIN", 0)  # (a small blob, for the test)
    data = os.urandom(10 * 4096 + 123)  # 11 chunks, the last one short
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = file_digest(
        (chunk_id(data[off : off + 4096]), len(data[off : off + 4096]))
        for off in range(0, len(data), 4096)
    )
    parallel = min(threads, len(os.sched_getaffinity(0))) > 1
    both = threading.Barrier(2, timeout=30)
    seen: list[int] = []

    def hook(off: int) -> None:
        seen.append(off)
        if parallel and off < 2 * 4096:
            both.wait()  # the first two chunks are hashed at once, or this times out

    fd = os.open(path, os.O_RDONLY)
    try:
        assert digest_of(fd, len(data), 4096, hook) == want
        assert sorted(seen) == list(range(0, len(data), 4096))
        # a file shorter than the size asked for: the read that comes up short says so
        with pytest.raises(EOFError):
            digest_of(fd, len(data) + 4096, 4096)
    finally:
        os.close(fd)


def test_a_scan_removes_what_is_no_blob_file_at_the_names_blobs_go(
    tier: Tier, tmp_path: Path
) -> None:
    """A tier holds hostd's own regular files; what root put there by hand at a name a blob
    goes (a symlink to a file outside, a directory, a file where blobs/<xx> goes, a
    directory in partial/) is no blob. It was taken for one (a symlink was linked into
    trees; a directory stopped the daemon's start, or every restore of its snapshot); the
    scan removes it, following nothing."""
    keep = tier.write_whole(REAL, DATA)
    outside = tmp_path / "outside"
    outside.write_bytes(DATA)
    linked = Path(tier.blob_file(bytes.fromhex("11" * 32)))
    linked.parent.mkdir()
    linked.symlink_to(outside)
    dir_blob = Path(tier.blob_file(bytes.fromhex("22" * 32)))
    dir_blob.parent.mkdir()
    (dir_blob / "inside").mkdir(parents=True)
    prefix = tier.blobs_dir / "33"
    prefix.write_bytes(b"where a directory goes")
    dir_partial = tier.partial_path(OTHER)
    dir_partial.mkdir()

    complete, partial = tier.scan()

    assert [b.digest for b in complete] == [keep.digest]
    assert partial == []
    for p in (linked, dir_blob, prefix, dir_partial):
        assert not os.path.lexists(p), p
    assert outside.read_bytes() == DATA  # not followed
    assert tier.blob_path(REAL).read_bytes() == DATA


@pytest.mark.parametrize("way", ["directory", "prefix_file"])
@pytest.mark.parametrize("how", ["write_whole", "write_wholes", "install"])
def test_a_blob_is_installed_past_what_is_in_its_way(tier: Tier, way: str, how: str) -> None:
    """A directory at a blob's name, or a file where its blobs/<xx> goes, made every fill of
    that blob fail ("Is a directory"), for good: what is in the way goes."""
    dest = tier.blob_path(REAL)
    if way == "directory":
        (dest / "inside").mkdir(parents=True)
    else:
        dest.parent.write_bytes(b"x")
    if how == "write_whole":
        got = tier.write_whole(REAL, DATA)
    elif how == "write_wholes":
        (r,) = tier.write_wholes([(REAL, DATA, None, BLOB_MODE)])
        assert not isinstance(r, TierError), r
        got = r
    else:
        scratch = tier.tmp_dir / "scratch"
        scratch.write_bytes(DATA)
        scratch.chmod(BLOB_MODE)
        got = tier.install(scratch, REAL, partial=False)
    assert got.size == len(DATA)
    assert stat.S_ISREG(os.lstat(dest).st_mode)
    assert dest.read_bytes() == DATA


def test_a_record_dropped_over_a_directory_removes_it(tier: Tier) -> None:
    """Dropping a record whose name holds a directory (put there while hostd ran) raised
    IsADirectoryError out of eviction and gc: an internal error, and the gc ended early."""
    dest = tier.blob_path(REAL)
    (dest / "inside").mkdir(parents=True)
    tier.remove_blob_if(REAL, tier.inode(REAL))
    assert not os.path.lexists(dest)
    (dest / "inside").mkdir(parents=True)
    tier.remove_blob(REAL)
    assert not os.path.lexists(dest)
    part = tier.partial_path(REAL)
    part.mkdir()
    tier.remove_partial(REAL)
    assert not os.path.lexists(part)


def test_installs_racing_into_a_new_prefix_all_land(tmp_path: Path) -> None:
    """Clearing the way for a blob (a file where blobs/<xx> goes) took a blobs/<xx> that
    another install had just made for a stray, and removed it, that blob in it: four
    installs at once into a new prefix lost one in twenty. Nothing made is removed."""
    lost = 0
    for r in range(150):
        t = Tier("mem", tmp_path / f"t{r}", budget=1 << 30)
        t.prepare()
        digests = [bytes([0xAB]) + os.urandom(31) for _ in range(4)]
        scratch = []
        for i in range(4):
            p = t.tmp_dir / f"s{i}"
            p.write_bytes(DATA[:100])
            scratch.append(p)
        start = threading.Barrier(4)

        def install(t: Tier, start: threading.Barrier, src: Path, digest: bytes) -> None:
            start.wait()
            t.install(src, digest, partial=False)

        threads = [
            threading.Thread(target=install, args=(t, start, scratch[i], digests[i]))
            for i in range(4)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        lost += sum(not t.blob_path(d).exists() for d in digests)
    assert lost == 0

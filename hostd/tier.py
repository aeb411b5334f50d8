"""One tier: a cache directory of blobs with a byte budget.

Layout under the tier's root:
    blobs/<hex[0:2]>/<hex>   complete blobs, read-only (0444), named by file digest
    partial/<hex>            a blob being filled, sparse, written chunk by chunk
    partial/<hex>.have       one byte per chunk: 1 once that chunk's bytes are written
    tmp/                     scratch (publish writes a blob here before it knows its digest)

A chunk's presence byte is written only after its bytes, so a process killed between the two
refetches the chunk rather than trusting a hole; a partial blob reopened after a restart has
every present chunk re-hashed before it is trusted (see PartialBlob.recheck). A blob becomes
complete by setting its recorded mtime, chmod read-only, rename into blobs/ (a blob written
whole in a batch, `write_wholes`: an unnamed O_TMPFILE file linked into blobs/ once whole,
where the filesystem has them): nothing that looks complete was ever half written by a live
process. Durability is the caller's choice:
`durable=True` fsyncs each blob before its rename (a cost per file: a journal commit each on
ext4); `durable=False` leaves it to one `sync` of the whole filesystem for a batch of blobs
(syncfs(2)), which must return before any of them is recorded in the index. The directory is
not fsynced per blob: a rename that a power cut loses leaves no blob, which start-up's
reconciliation turns into a refetch (docs/ARCHITECTURE.md, "Durability").

All methods here do blocking file I/O: callers run them in a thread. This module knows
nothing of the index, budgets or eviction (cache.py decides those).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hostd import fastcopy
from hostd.core.ids import chunk_id, file_digest
from hostd.core.manifest import Chunk
from hostd.errors import HostdError, TierError, os_cause
from hostd.fileio import copy_range, libc, start_writeback, syncfs
from hostd.lock import private_dir

log = logging.getLogger(__name__)

BLOB_MODE = 0o444
# A blob installed for a file that is readable and executable by everyone: linked, it shows
# the file's exec bits (as a 0444 blob shows a 0644 file's read bits).
EXEC_BLOB_MODE = 0o555


def blob_mode(file_mode: int) -> int:
    """The mode of a blob installed for a file of mode `file_mode`: EXEC_BLOB_MODE where
    the file has r-x for everyone, else BLOB_MODE."""
    return EXEC_BLOB_MODE if file_mode & EXEC_BLOB_MODE == EXEC_BLOB_MODE else BLOB_MODE


def mode_of(st_mode: int) -> int:
    """A stat's st_mode without the file type: what a blob's record keeps. A blob hostd
    made has BLOB_MODE or EXEC_BLOB_MODE; any other (a chmod behind hostd's back, through a
    link by a caller that may write the cache) is kept as it is, and links no file."""
    return st_mode & 0o7777


# A blob file a scan found: its digest and its stat, (size, mtime_ns, ctime_ns, mode).
Found = tuple[bytes, fastcopy.Stat]

set_mtime = fastcopy.set_mtime  # (the batch writers' twin uses it too)


class BlobCopyCorrupt(HostdError):
    """A blob copied between tiers does not hash to its digest: its source is bad. The
    cache acts on it (drops the source); it is not meant to reach a caller."""

    code = "blob_corrupt"
    status = 500

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True, slots=True)
class BlobStat:
    """What a blob's trust is checked against: no write, link, unlink or chmod of its inode
    leaves all three as they were (ctime cannot be set back by anyone but the clock)."""

    digest: bytes
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int = BLOB_MODE  # mode_of its file's

    @classmethod
    def of(cls, digest: bytes, st: os.stat_result) -> BlobStat:
        return cls(digest, st.st_size, st.st_mtime_ns, st.st_ctime_ns, mode_of(st.st_mode))

    def same_file_state(self, other: BlobStat) -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns) == (
            other.size,
            other.mtime_ns,
            other.ctime_ns,
        )


def tier_error(tier: str, path: Path | str, e: OSError, doing: str) -> TierError:
    """Translate an OSError from a tier into hostd's error, naming tier, path and cause."""
    return TierError(
        f"tier {tier!r} ({path}): {doing} failed: {os_cause(e)} ({e.strerror or e})",
        e.errno,
        tier,
    )


# A sync of at most this many blobs fsyncs each (and their directories), not the filesystem.
FSYNC_EACH = 4
# libc's syncfs where it has one, else None: Tier.sync then fsyncs each blob instead.
SYNCFS: Callable[[Path], None] | None = syncfs if hasattr(libc, "syncfs") else None


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `fd` at `offset`; EOFError if the file ends first."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise EOFError(f"short read at offset {offset + got}")
        got += n


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    buf = bytearray(size)
    pread_into(fd, memoryview(buf), offset)
    return bytes(buf)


# A blob of several chunks is hashed by up to this many threads at once, each reading and
# hashing its own chunks (pread and BLAKE3 both let go of the GIL), within this many bytes
# of buffers: one thread moved ~1.8 GiB/s (a read, then a hash), the link of an H200 host
# 51 GiB/s, and a warm link restore of lent blobs re-hashes every byte.
HASH_THREADS = 8
HASH_BUFFERS = 64 << 20
# Smaller blobs, or fewer chunks, are hashed on the calling thread: a pool's start and a
# future per chunk cost more than they save there (5,000 blobs of 2 chunks: 10x slower).
HASH_PARALLEL_MIN = 16 << 20
HASH_PARALLEL_CHUNKS = 4


def _unlink_if(path: Path, ino: int | None) -> bool:
    """Unlink `path` if it is inode `ino`; whether it was. (Between the stat and the unlink
    a rename over the name can still land: that window is two system calls, where the one
    this closes was a thread pool's queue.)"""
    if ino is None:
        return False
    try:
        if os.lstat(path).st_ino != ino:
            return False
    except FileNotFoundError:
        return False
    _clear(path)
    return True


def _clear(path: str | Path) -> None:
    """Remove whatever is at `path` in a tier (a file, or a directory and all it holds:
    nothing of a tier's own is a directory where a blob goes, and hostd never follows a
    symlink there); nothing if there is nothing."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)  # (by descriptor: it follows no symlink inside either)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _stray(path: str, what: str) -> None:
    """Remove `what` found at `path`, a name in a tier that holds only hostd's own files:
    put there by hand (root), and never a blob."""
    log.warning("tier: removing %s: %s, not a blob file", path, what)
    try:
        _clear(path)
    except OSError as e:
        log.warning("tier: could not remove %s: %s", path, os_cause(e))


def _unlink_no_dir(path: str) -> None:
    """Remove the file or symlink where a blobs/<xx> directory goes; never a directory (one
    another install made since this one looked stays, its blobs in it: unlink takes none)."""
    log.warning("tier: removing %s: no directory, where blobs go", path)
    with contextlib.suppress(OSError):
        os.unlink(path)


def _kind(st_mode: int) -> str:
    if stat.S_ISDIR(st_mode):
        return "a directory"
    if stat.S_ISLNK(st_mode):
        return "a symlink"
    return "no regular file"


def digest_of(
    fd: int, size: int, chunk_size: int, on_read: Callable[[int], None] | None = None
) -> bytes:
    """The file digest of the first `size` bytes of `fd`, hashed chunk by chunk (blocking),
    its chunks spread over threads (HASH_THREADS). `on_read(offset)` runs after each chunk
    is read, on the thread that read it: a test's hook into the middle of a hash."""
    offsets = range(0, size, chunk_size)
    threads = min(
        HASH_THREADS, len(os.sched_getaffinity(0)), len(offsets), HASH_BUFFERS // chunk_size
    )
    if size < HASH_PARALLEL_MIN or len(offsets) < HASH_PARALLEL_CHUNKS:
        threads = 1
    local = threading.local()

    def one(off: int) -> tuple[bytes, int]:
        n = min(chunk_size, size - off)
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(min(chunk_size, size))
        view = memoryview(buf)[:n]
        pread_into(fd, view, off)
        got = chunk_id(view)
        if on_read is not None:
            on_read(off)
        return got, n

    if threads <= 1:
        return file_digest(one(off) for off in offsets)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="hostd-hash")
    try:
        ids: list[tuple[bytes, int]] = []
        window = 4 * threads  # futures in flight: not one per chunk of a huge blob at once
        for at in range(0, len(offsets), window):
            ids += pool.map(one, offsets[at : at + window])
        return file_digest(ids)
    finally:
        pool.shutdown(cancel_futures=True)  # (after an error: the chunks not begun are not read)


class PartialBlob:
    """A blob being filled in one tier. Not thread-safe per chunk index; distinct chunks may be
    written from different threads at once (pwrite at distinct offsets)."""

    def __init__(self, tier: Tier, digest: bytes, size: int, n_chunks: int) -> None:
        self.tier = tier
        self.digest = digest
        self.size = size
        self.path = tier.partial_path(digest)
        self.have_path = self.path.with_name(self.path.name + ".have")
        self.resumed = False
        # Writes of distinct chunks run in parallel threads; close() must not pull the fds
        # from under one (a reused fd number would take another file's bytes), so it marks
        # the blob closed and waits for the writes in progress.
        self._io = threading.Condition()
        self._writing = 0
        self._closed = False
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self.have_fd = os.open(self.have_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except BaseException:
                os.close(self.fd)
                raise
        except OSError as e:
            raise tier_error(tier.name, self.path, e, "creating a blob") from e
        try:
            st = os.fstat(self.fd)
            have = os.pread(self.have_fd, n_chunks + 1, 0)
            if st.st_size == size and len(have) == n_chunks:
                self.have = bytearray(have)
                self.resumed = any(self.have)
            else:  # new, or a leftover that does not fit this blob: start over
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size)
                self.have = bytearray(n_chunks)
                os.ftruncate(self.have_fd, 0)
                pwrite_all(self.have_fd, self.have, 0)
        except OSError as e:
            self.close()
            raise tier_error(tier.name, self.path, e, "preparing a blob") from e

    def __repr__(self) -> str:
        return (
            f"PartialBlob({self.tier.name}:{self.digest.hex()[:12]} "
            f"{sum(self.have)}/{len(self.have)} chunks)"
        )

    def missing(self) -> list[int]:
        return [i for i, h in enumerate(self.have) if not h]

    @property
    def full(self) -> bool:
        return all(self.have)

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        with self._io:
            if self._closed:
                raise TierError(f"blob {self.digest.hex()} in tier {self.tier.name!r} is closed")
            self._writing += 1
        try:
            pwrite_all(self.fd, data, offset)
            # The presence byte goes after the data: a crash between the two loses the chunk,
            # never trusts a hole.
            pwrite_all(self.have_fd, b"\x01", index)
            # On a disk, the chunk streams to it while the rest is fetched: the blob's sync
            # (Tier.sync) then waits for its last chunks, not for all of it.
            start_writeback(self.fd, offset, len(data))
        except OSError as e:
            raise tier_error(self.tier.name, self.path, e, "writing a chunk") from e
        finally:
            with self._io:
                self._writing -= 1
                self._io.notify_all()
        self.have[index] = 1

    def read(self, offset: int, size: int) -> bytes:
        return pread_exact(self.fd, size, offset)

    def recheck(self, chunks: Sequence[Chunk], chunk_size: int) -> int:
        """Re-hash every chunk marked present; clear the ones that do not verify. Returns how
        many were cleared. Used on a blob left by an earlier run (it may have died mid-write)."""
        bad = 0
        for i, c in enumerate(chunks):
            if self.have[i] and chunk_id(self.read(i * chunk_size, c.size)) != c.id:
                self.have[i] = 0
                pwrite_all(self.have_fd, b"\x00", i)
                bad += 1
        return bad

    def complete(
        self, mtime_ns: int | None = None, *, durable: bool = True, mode: int = BLOB_MODE
    ) -> BlobStat:
        """Set its mtime, make it read-only (`mode`: BLOB_MODE or EXEC_BLOB_MODE), rename it
        into blobs/; with `durable`, fsync it first. Without, the caller must `Tier.sync`
        before recording it (see the module)."""
        if not self.full:
            raise TierError(f"blob {self.digest.hex()} is not full; refusing to complete it")
        dest = self.tier.blob_path(self.digest)
        with self._io:  # counted like a write, so a close() from elsewhere waits for it
            if self._closed:
                raise TierError(f"blob {self.digest.hex()} in tier {self.tier.name!r} is closed")
            self._writing += 1
        try:
            set_mtime(self.fd, mtime_ns)
            if durable:
                os.fsync(self.fd)
            os.fchmod(self.fd, mode)
            return self.tier.install(self.path, self.digest)  # also drops the .have file
        except OSError as e:
            raise tier_error(self.tier.name, dest, e, "completing a blob") from e
        finally:
            with self._io:
                self._writing -= 1
                self._io.notify_all()
            self.close()

    def close(self) -> None:
        with self._io:
            self._closed = True
            self._io.wait_for(lambda: self._writing == 0)
            for name in ("fd", "have_fd"):
                fd = getattr(self, name, -1)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)

    def discard(self) -> None:
        self.close()
        for p in (self.path, self.have_path):
            with contextlib.suppress(OSError):  # best effort: the caller reports the failure
                os.unlink(p)


class Tier:
    """One cache directory. Holds no state beyond its paths: the index is the cache's."""

    def __init__(
        self,
        name: str,
        root: Path,
        budget: int,
        *,
        syncfs: Callable[[Path], None] | None = SYNCFS,
        fsync_each: int = FSYNC_EACH,
    ) -> None:
        """`syncfs`: None fsyncs each blob instead (a test passes its own); `fsync_each`:
        batches up to this many blobs are fsynced blob by blob instead (0: never)."""
        self.name = name
        self.root = root
        self.budget = budget
        self._syncfs = syncfs
        self._fsync_each = fsync_each
        # Syncs of this tier that failed, by any caller: a write-back error is reported once,
        # to whichever sync comes first, so a batch whose own sync passed checks this too
        # (durable.Durability)
        self.failed_syncs = 0
        self._failed_lock = threading.Lock()
        self.blobs_dir = root / "blobs"
        self._blobs_prefix = f"{self.blobs_dir}/"  # (blob_file: no Path's str per blob)
        self.partial_dir = root / "partial"
        self.tmp_dir = root / "tmp"

    def __repr__(self) -> str:
        return f"Tier({self.name!r}, {str(self.root)!r}, budget={self.budget})"

    def free_bytes(self) -> int | None:
        """The bytes its filesystem has free for the daemon now (statvfs); None if unknown."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def allocated(self, partial: Iterable[bytes]) -> int:
        """The bytes the filesystem holds for the partial blobs of `partial` and for the
        scratch files in tmp/ (all of it being written: the start sweeps leftovers)."""
        total = 0
        for digest in partial:
            with contextlib.suppress(OSError):  # (not opened yet, or completed meanwhile)
                total += os.stat(self.partial_path(digest)).st_blocks * 512
        with contextlib.suppress(OSError), os.scandir(self.tmp_dir) as scratch:
            for entry in scratch:
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

    def prepare(self) -> None:
        """Create the layout, private (0700), and prove the tier writable; sweep scratch
        leftovers. Only under the daemon's lock on this tier (hostd/lock.py): the sweep would
        break another daemon's fills."""
        probe = self.tmp_dir / f".probe-{os.getpid()}"
        try:
            for d in (self.root, self.blobs_dir, self.partial_dir, self.tmp_dir):
                private_dir(d)
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise tier_error(self.name, self.root, e, "preparing the tier") from e
        for p in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):  # (a scratch left that will not go: no matter)
                _clear(p)
        # A blob installed (its partial file renamed into blobs/) just before a kill leaves
        # its .have: the next partial blob of that digest starts afresh, but nothing else
        # would ever remove this one.
        for p in self.partial_dir.glob("*.have"):
            if not p.with_suffix("").exists():
                with contextlib.suppress(OSError):
                    _clear(p)

    def st_dev(self) -> int:
        return os.stat(self.root).st_dev

    def blob_path(self, digest: bytes) -> Path:
        return Path(self.blob_file(digest))

    def blob_file(self, digest: bytes) -> str:
        """blob_path as a string: a restore of 100,000 files asks for as many."""
        h = digest.hex()
        return f"{self._blobs_prefix}{h[:2]}/{h}"

    def partial_path(self, digest: bytes) -> Path:
        return self.partial_dir / digest.hex()

    def open_partial(self, digest: bytes, size: int, n_chunks: int) -> PartialBlob:
        return PartialBlob(self, digest, size, n_chunks)

    def stat_blob(self, digest: bytes) -> BlobStat | None:
        try:
            st = os.lstat(self.blob_path(digest))
        except FileNotFoundError:
            return None
        return BlobStat.of(digest, st)

    def scan(self) -> tuple[list[BlobStat], list[BlobStat]]:
        """Complete blobs and partial blobs on disk, as lists (see complete_blobs)."""
        complete = [_stat_of(d, st) for found in self.complete_blobs() for d, st in found]
        partial = [_stat_of(d, st) for d, st in self.partial_blobs()]
        return complete, partial

    def complete_blobs(self) -> Iterator[list[Found]]:
        """The complete blobs on disk, one directory (blobs/<xx>) at a time, so that a walk
        of a million holds a few thousand at once. Names that are not ids are ignored, and so
        is a file gone between its directory's listing and its stat."""
        root = str(self.blobs_dir)
        for sub in _listdir(root):
            d = f"{root}/{sub}"
            if not _is_prefix(sub):
                # No blob lives there: never listed, never followed (a symlink with such a
                # name may lead out of the tier, and _found removes what it finds).
                continue
            if not _is_dir(d):  # (where blobs/<xx> goes: none could)
                _unlink_no_dir(d)
                continue
            yield _found(d)

    def partial_blobs(self) -> list[Found]:
        """The partial blobs on disk (their .have files aside), as complete_blobs."""
        return _found(str(self.partial_dir))

    def inode(self, digest: bytes, *, partial: bool = False) -> int | None:
        """The inode of the blob's (or partial blob's) file now; None if there is none."""
        try:
            return os.lstat(self.partial_path(digest) if partial else self.blob_path(digest)).st_ino
        except OSError:
            return None

    def remove_blob(self, digest: bytes) -> None:
        _clear(self.blob_path(digest))

    def remove_unrecorded(self, st: BlobStat) -> None:
        """Remove the blob file this tier's writer installed with stat `st` and nothing has
        recorded, if that file is still at its name (same size, mtime and ctime)."""
        path = self.blob_file(st.digest)
        with contextlib.suppress(OSError):
            if st.same_file_state(BlobStat.of(st.digest, os.lstat(path))):
                os.unlink(path)

    def remove_partial(self, digest: bytes) -> None:
        p = self.partial_path(digest)
        for q in (p, p.with_name(p.name + ".have")):
            _clear(q)

    def remove_blob_if(self, digest: bytes, ino: int | None) -> None:
        """Remove the blob's file if it is still inode `ino` (`inode`, taken when its record
        was dropped): the cache drops a record, then removes its file on a thread, and a
        fill may have installed a new copy under the same name in between, which a new
        record vouches for. None: there was no file to remove."""
        _unlink_if(self.blob_path(digest), ino)

    def remove_partial_if(self, digest: bytes, ino: int | None) -> None:
        """Remove a partial blob (its file, and its `.have`) if its file is still inode `ino`;
        a stray `.have` where there was no file. (A fill that reopened the same file, rather
        than making a new one, is not told apart: it fails at its install, with an error.)"""
        p = self.partial_path(digest)
        if _unlink_if(p, ino) or ino is None:
            _clear(p.with_name(p.name + ".have"))

    def install(self, scratch: Path, digest: bytes, *, partial: bool = True) -> BlobStat:
        """Rename a finished file (read-only, verified, its mtime set) into blobs/ as `digest`.

        The way a blob becomes complete (but those `write_wholes` names as they are made). It
        replaces whatever sits there already: that file is not known to be intact (a leftover
        no record vouches for), this one is; the rename is atomic, and restored trees linked
        to the old inode keep it. `partial`: a partial blob of this digest may be left to
        remove (not so for a blob written whole, which the cache fills that way only when it
        knows of no partial one)."""
        dest = self.blob_path(digest)
        try:
            os.rename(scratch, dest)
        except OSError as e:  # the first blob under this prefix: one syscall otherwise
            if e.errno not in _IN_THE_WAY or not os.path.exists(scratch):
                raise
            self._make_way(dest)
            os.rename(scratch, dest)
        if partial:
            self.remove_partial(digest)  # a leftover of an earlier, interrupted fill
        # Taken after the rename (which moves ctime): the file was written by us alone, in
        # this private tier, so this stat is of the verified bytes.
        return BlobStat.of(digest, os.stat(dest))

    def _make_way(self, dest: str | Path) -> None:
        """Make blob name `dest` one a file can be renamed to: its blobs/<xx> directory made,
        a file or symlink where it goes unlinked first (never a directory: another install
        may have made it since our rename failed, and its blob be in it already), and a
        directory at the blob's name itself removed (nothing of hostd's is one). Raises
        nothing: what it could not clear, the write it clears for fails on, and says so."""
        parent = os.path.dirname(dest)
        try:
            os.mkdir(parent)
        except FileExistsError:
            if not _is_dir(parent):
                _unlink_no_dir(parent)
                with contextlib.suppress(OSError):
                    os.mkdir(parent)
        except OSError:
            return  # (blobs/ itself gone, the tier read-only: the write says what)
        if _is_dir(str(dest)):
            _stray(str(dest), "a directory")

    def install_new(self, scratch: Path, digest: bytes) -> BlobStat | None:
        """`install` (partial=False) where no file has the name yet; None (and `scratch`
        removed) where one has: a publish's copy of a blob the tier holds already must not
        take its place. A restore that checked that inode links it by name afterwards, and
        the publish's may differ in mtime and mode (the same bytes published 0755 and
        0644): the link would show the publish's."""
        dest = self.blob_file(digest)
        err, _ = fastcopy.install_file(str(scratch), dest, replace=False)
        if err == errno.EEXIST:
            os.unlink(scratch)
            return None
        if err:
            raise OSError(err, os.strerror(err), dest)
        return BlobStat.of(digest, os.stat(dest))

    def write_whole(
        self,
        digest: bytes,
        data: bytes | memoryview,
        mtime_ns: int | None = None,
        *,
        durable: bool = True,
        mode: int = BLOB_MODE,
    ) -> BlobStat:
        """Write a blob that came whole (one verified chunk) without partial-blob state, of
        `mode` (BLOB_MODE or EXEC_BLOB_MODE). With `durable`, fsynced before its rename;
        without, `sync` must follow before it is recorded."""
        scratch = self.tmp_dir / f"{digest.hex()}.{os.getpid()}.{threading.get_ident()}"
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                pwrite_all(fd, data, 0)
                set_mtime(fd, mtime_ns)
                if durable:
                    os.fsync(fd)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            return self.install(scratch, digest, partial=False)
        except OSError as e:
            with contextlib.suppress(OSError):  # on a read-only tier this fails too
                os.unlink(scratch)
            raise tier_error(self.name, scratch, e, "writing a blob") from e

    def write_wholes(
        self,
        blobs: Sequence[tuple[bytes, bytes | memoryview, int | None, int]],
        doing: str = "writing a blob",
    ) -> list[BlobStat | TierError]:
        """write_whole(durable=False) for a batch of (digest, bytes, mtime_ns, mode)
        (blocking):
        one fastcopy.write_blobs call (in C, without the GIL, where it was built), so a tree
        of small files costs a thread hop per batch, not per blob. Each blob is written as
        an unnamed file (O_TMPFILE) and linked into blobs/ once whole, with no scratch name
        to make and rename across directories (fastcopy.py says why); where that cannot be
        (no O_TMPFILE, a leftover at its name), as write_whole.
        One outcome per blob, in order; a blob that failed left nothing behind (its
        TierError says `doing`). `sync` must follow before any is recorded."""
        out: list[BlobStat | TierError] = []
        for r in self._write_wholes(blobs, doing, replace=True):
            assert r is not None  # (only where a file is not replaced)
            out.append(r)
        return out

    def write_new(
        self,
        blobs: Sequence[tuple[bytes, bytes | memoryview, int | None, int]],
        doing: str = "writing a blob",
    ) -> list[BlobStat | TierError | None]:
        """write_wholes, but a blob whose name a file has already is not written: its
        outcome is None, and that file stays. A publish's way: a restore may have checked
        that inode and links it by name (see install_new)."""
        return self._write_wholes(blobs, doing, replace=False)

    def _write_wholes(
        self,
        blobs: Sequence[tuple[bytes, bytes | memoryview, int | None, int]],
        doing: str,
        *,
        replace: bool,
    ) -> list[BlobStat | TierError | None]:
        pid, tid = os.getpid(), threading.get_ident()  # scratch names: ours alone
        jobs: list[fastcopy.BlobJob] = [
            (
                f"{self.tmp_dir}/{digest.hex()}.{pid}.{tid}.{i}",
                self.blob_file(digest),
                data,
                mtime_ns,
                mode,
            )
            for i, (digest, data, mtime_ns, mode) in enumerate(blobs)
        ]
        out: list[BlobStat | TierError | None] = []
        got = fastcopy.write_blobs(jobs, replace=replace)
        blocked = [i for i, r in enumerate(got) if len(r) == 2 and r[0] in _IN_THE_WAY]
        if blocked:  # something at a name, or at its blobs/<xx>, that no blob can be: once
            for i in blocked:
                self._make_way(jobs[i][1])
            again = fastcopy.write_blobs([jobs[i] for i in blocked], replace=replace)
            for i, r in zip(blocked, again, strict=True):
                got[i] = r
        for (digest, *_, mode), job, r in zip(blobs, jobs, got, strict=True):
            if len(r) == 3:
                out.append(BlobStat(digest, *r, mode))
            elif not replace and r == (errno.EEXIST, fastcopy.RENAME):
                out.append(None)
            else:
                cause = fastcopy.blob_error(job, r)
                out.append(tier_error(self.name, cause.filename, cause, doing))
        return out

    def copy_in(
        self, src: Path, digest: bytes, size: int, chunk_size: int, *, durable: bool = True
    ) -> BlobStat:
        """Copy a complete blob from another tier into this one (demotion, promotion).

        The copy is hashed against `digest` before it is installed: the source may have been
        written through since it was last verified (a hardlinked blob), and a copy must never
        give changed bytes a fresh record. BlobCopyCorrupt if it does not match (nothing is
        left behind); the copy lives in this private tier, so no one writes it after the hash.
        The copy keeps the source's mtime (the time of the file it was installed for) and
        mode, so the files linked to it get theirs. `durable` as write_whole's.
        """
        tmp = self.tmp_dir / f"{digest.hex()}.{os.getpid()}.{threading.get_ident()}.copy"
        dest = self.blob_path(digest)
        if chunk_size <= 0:
            raise BlobCopyCorrupt("no manifest gives its chunk size, so it cannot be checked")
        try:
            with open(src, "rb") as fi:
                have = os.fstat(fi.fileno()).st_size
                if have != size:  # also keeps a source grown by a writer from filling the tier
                    raise BlobCopyCorrupt(f"size {have}, want {size}")
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    try:
                        copy_range(fi.fileno(), fd, size)
                    except OSError as e:
                        if os.fstat(fi.fileno()).st_size != size:  # truncated by a writer
                            raise BlobCopyCorrupt("it shrank while it was copied") from e
                        raise
                    # Taken after the copy: a touch during it is the source's time now.
                    was = os.fstat(fi.fileno())
                    set_mtime(fd, was.st_mtime_ns)
                    if durable:
                        os.fsync(fd)
                    exe = mode_of(was.st_mode) == EXEC_BLOB_MODE
                    os.fchmod(fd, EXEC_BLOB_MODE if exe else BLOB_MODE)
                    if digest_of(fd, size, chunk_size) != digest:
                        raise BlobCopyCorrupt("content does not match its digest")
                finally:
                    os.close(fd)
            return self.install(tmp, digest)
        except BlobCopyCorrupt as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            e.add_note(f"copying blob {digest.hex()} from {src} into tier {self.name!r}")
            raise
        except OSError as e:
            with contextlib.suppress(OSError):  # on a read-only tier this fails too
                os.unlink(tmp)
            raise tier_error(self.name, dest, e, "copying a blob in") from e

    def failed_since(self, count: int) -> TierError | None:
        """An error where a sync of this tier failed since `failed_syncs` was `count` (taken
        before a batch's first byte was written): the write-back error that sync was told
        may have been the batch's, which the batch's own sync is then not told."""
        if self.failed_syncs == count:
            return None
        return TierError(
            f"tier {self.name!r} ({self.root}): another sync of it failed while this batch of "
            "blobs was written, and its error may have been theirs",
            tier=self.name,
        )

    def sync(self, digests: Iterable[bytes], *, each: bool = False) -> None:
        """Make durable every blob installed here with `durable=False` (`digests` names
        them): one syncfs of the tier's filesystem, which also commits their names. Since
        Linux 5.8 syncfs reports a write-back error on the filesystem that no one has seen
        yet (a fresh descriptor starts unseen errors at zero), once. `each`, or where libc
        has no syncfs: fsync each of `digests` (which reports an error of that file no one has
        seen), then the directories they were renamed into. TierError if a write-back failed:
        which blob, syncfs cannot say.

        A batch of at most `fsync_each` blobs (big files' blobs, landing one by one) is
        fsynced blob by blob too: a syncfs would also write back whatever else is dirty on
        that filesystem (the restore's own copies on it, other programs' files), and wait."""
        digests = list(digests)
        few = len(digests) <= self._fsync_each and not each
        try:
            if self._syncfs is not None and not few:
                self._syncfs(self.blobs_dir)
                if not each:
                    return
            dirs = {self.blobs_dir}
            for d in digests:
                p = self.blob_path(d)
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # evicted meanwhile: nothing to make durable
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dirs.add(p.parent)
            for dp in dirs:
                fd = os.open(dp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            with self._failed_lock:
                self.failed_syncs += 1
            raise tier_error(self.name, self.root, e, "syncing its blobs to disk") from e


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):  # gone, or a stray file where a dir goes
        return []


def _stat_of(digest: bytes, st: fastcopy.Stat) -> BlobStat:
    size, mtime_ns, ctime_ns, mode = st
    return BlobStat(digest, size, mtime_ns, ctime_ns, mode_of(mode))


def _found(d: str) -> list[Found]:
    """The blob files in directory `d`: (digest, stat) of each name that is an id, stat in
    one fastcopy.lstat_paths call (in C where it was built). What sits at such a name and
    is no regular file (a directory, a symlink: put there by hand) is removed."""
    ids: list[bytes] = []
    paths: list[str] = []
    for name in _listdir(d):
        if (digest := _id(name)) is not None:
            ids.append(digest)
            paths.append(f"{d}/{name}")
    stats = fastcopy.lstat_paths(paths)
    out: list[Found] = []
    for digest, path, st in zip(ids, paths, stats, strict=True):
        if isinstance(st, int):
            continue
        if not stat.S_ISREG(st[3]):
            _stray(path, _kind(st[3]))
            continue
        out.append((digest, st))
    return out


# Errors of a rename (or link) into blobs/ that something in the way gives: no blobs/<xx>
# directory, or a file there; a directory at the blob's own name.
_IN_THE_WAY = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY)


def _is_prefix(name: str) -> bool:
    """Whether `name` is a blobs/<xx> directory's (two lowercase hex digits)."""
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _id(name: str) -> bytes | None:
    """The digest a file name spells (64 lowercase hex digits), else None."""
    if len(name) != 64:
        return None
    try:
        digest = bytes.fromhex(name)
    except ValueError:
        return None
    return digest if digest.hex() == name else None  # no upper case, no spaces

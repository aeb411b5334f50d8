"""Batches of small-file syscalls, compiled where it pays: a restore's files, a tier's blobs.

`create_files`: the restore helper (fsops.py) creates every file of a `copy` restore with
the caller's rights. Per job `(dirfd, leaf, mode, size, src_fd, mtime_ns)`:

    open `leaf` under `dirfd` (O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0600)
    copy `size` bytes from `src_fd`'s position (fileio.copy_range: copy_file_range, else
        sendfile); src_fd -1 makes an empty file
    fchmod(mode); utime(mtime_ns, mtime_ns) unless mtime_ns is None; close

The first failure stops the batch (jobs already started finish) and is raised as
OSError(errno, strerror, filename) with the job's path (`paths[i]`, else its leaf), so an
O_EXCL collision is a FileExistsError; a source that ends early is EIO, "source shrank
while copying".

`write_blobs`: a fill (fill.py) or a publish (publish.py) stores a batch of one-chunk blobs
in a tier. Per job `(scratch, dest, data, mtime_ns, mode)`, first as an unnamed file named
only once whole:

    open `dest`'s directory O_TMPFILE (O_WRONLY|O_CLOEXEC, 0600; making the directory, one
        level, where it is missing), on the filesystem of `scratch`'s directory (the tier's)
    pwrite, utime and fchmod as below; linkat to `dest` (AT_EMPTY_PATH, else through
        /proc/self/fd); close; stat `dest`

The file has no name until it is whole, as with a rename, and there is no scratch entry to
make and remove (nor the filesystem's cross-directory rename lock, which every writer of a
tier shares, to take). Anything else (no O_TMPFILE, no /proc to name through, a leftover at
`dest`, a prefix directory leading off the tier, any failure) drops the unnamed file (and a
directory it made) and the job goes the scratch way, whose outcome is the job's:

    open `scratch` (O_WRONLY|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0600; a name taken already
        is a leftover of the caller's own, whose scratch names are unique to its pid,
        thread and batch index: it is unlinked and opened again)
    pwrite all of `data`; utime(mtime_ns, mtime_ns) unless None, where EINVAL, EOVERFLOW
        or ERANGE (a time the filesystem cannot hold) leave the write time, as
        set_mtime does; fchmod(mode); close
    rename to `dest`, making `dest`'s directory (one level) where the rename says ENOENT,
    then stat `dest`

No fsync: the caller syncs the batch (syncfs). Every job is tried whatever the others did;
the answer is one outcome per job, in order: `(size, mtime_ns, ctime_ns)` of the final stat,
or `(errno, stage)` (STAGES names the stage; `blob_error` makes it an OSError naming the
path). A job that failed leaves no scratch file, and no unnamed one, behind.

`lstat_paths(paths)`: the lstat of each path (a symlink is not followed: a tier's files are
regular files, and one that is not is no blob), `(size, mtime_ns, ctime_ns, st_mode)`, or
the errno where it failed: a warm restore checks every blob it uses this way (fill.py), ~6
µs a blob from Python's os.stat, ~1.5 µs here, and not on the event loop.

`link_files(jobs)`: `link` restores (materialize.py), per job `(src_dirfd, src_rel,
dst_dirfd, name)`, a linkat without following symlinks; the errno of each (0: linked).
Every job is tried. The native loop gives each of LINK_THREADS threads its share of the
jobs, in order.

`open_paths(paths)`, `fstat_fds(fds)`, `close_fds(fds)`: the daemon's side of a restore
(materialize.py), a batch at a time. `open_paths`: the blobs a `copy` restore hands to the
helper, `os.open(path, O_RDONLY | O_CLOEXEC)` of each, the descriptors in order; the first
failure closes what was opened and is raised as os.open raises it. `fstat_fds`: `(st_mode,
st_uid, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)` of each descriptor, the first
failure raised. `close_fds`: each closed, the first failure raised once all are. A Python
loop of os.open, os.fstat or os.close gives the GIL up at every call and must take it back,
which takes up to a switch interval (5 ms) each time another of the daemon's threads runs
Python meanwhile (a restore of 10,000 files went from ~0.3 s to over 1 s beside one such
thread); these give it up once a batch (and open ~2 µs a blob, against ~4 from Python).

A tree of small files costs the twins 40-60 µs of CPU a file, plus GIL contention between
their threads, against ~30 µs for `cp -r` (bench/fastcopy.py, 2 cores, tmpfs); a blob of
1-16 KiB ~50 µs (Tier.write_whole ~95, and ~150 µs of wall a blob from two threads, which
fight over the GIL: bench/fastcopy.py --blobs). So the same loops are compiled in
native/fastcopy.c (`hostd._fastcopy`: ~24 µs a file, ~40 µs a blob, most of it in the
kernel), where they run without the GIL; this module chooses it at import when it was built
and the environment's `HOSTD_NATIVE` is not `0`, else the pure-Python twins below. Both
give the same files and the same errors (tests/test_native.py).

Standard library only, and cheap to import: the helper imports it once per operation. It
resolves nothing beyond one leaf name under a directory descriptor already checked, but for
write_blobs, whose paths are the daemon's own, in its private tier directories.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import operator
import os
import threading
from collections.abc import Sequence
from typing import Protocol

from hostd.fileio import copy_range, link_fd

# (not in every Python's fcntl module: the kernel's numbers)
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
F_SETSIG = getattr(fcntl, "F_SETSIG", 10)

Job = tuple[int, str, int, int, int, int | None]
"""(dirfd, leaf name, mode, size, source descriptor or -1, mtime in ns or None)"""

Failure = tuple[int, int, int, int]
"""(job index, errno, stage, bytes short or -1) of create_files' first failure"""

BlobJob = tuple[str, str, "bytes | bytearray | memoryview", int | None, int]
"""(scratch path, destination path, the blob's bytes, mtime in ns or None, mode)"""
Written = tuple[int, int, int]
"""(size, mtime_ns, ctime_ns) of a blob's stat, taken once it has its name"""
Failed = tuple[int, int]
"""(errno, stage) of a blob that failed: STAGES[stage] says at what"""

OPEN, WRITE, UTIME, CHMOD, CLOSE, RENAME, MKDIR, STAT = range(8)
STAGES = (
    "opening its scratch file",
    "writing it",
    "setting its mtime",
    "setting its mode",
    "closing it",
    "renaming it into place",
    "making its directory",
    "reading its stat",
)
# write_blobs runs on one native thread a call: its callers make two calls at once (fill's
# WRITERS, publish's INGEST_THREADS), which takes 2 cores' blobs from ~40 µs to ~26 µs of
# wall a blob; two threads in one call, ~32 µs (bench/fastcopy.py --blobs).
BLOB_THREADS = 1

TWIN_THREADS = 4  # one copy stream leaves a disk's queue and a second core idle
# The native loop takes one thread per SPLIT_BYTES of the batch, up to NATIVE_THREADS: big
# copies go faster on several (one stream leaves a disk's queue, and a big host's cores,
# idle). A batch of small files goes on SMALL_THREADS where, in the order given, most files
# lie in another directory than the one before (materialize sends them largest first), or
# where they do once taken from two shares in turn (`spread`: a placer's batches come in
# tree order): files created in one directory serialise on its lock, files in two do not.
# 10,000 small files (bench/fastcopy.py, 2 cores, tmpfs): ~17 µs a file of wall on two
# threads where a core is free, ~23 on one (tree order: 9 against 14); the same CPU either
# way, so no loss where none is.
NATIVE_THREADS = 4
SPLIT_BYTES = 8 << 20
SMALL_THREADS = 2
SMALL_FILES = 64  # fewer go on one thread: a thread's start is not worth it
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# link_files: each thread links its share of the jobs, given in tree order, so into its own
# directories (~5.5 µs a link on tmpfs, most of it the kernel's).
LINK_THREADS = 2

Stat = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, st_mode)"""
LinkJob = tuple[int, str, int, str]
"""(source directory descriptor, source path under it, target directory descriptor, name)"""
FdStat = tuple[int, int, int, int, int, int, int]
"""(st_mode, st_uid, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)"""

Taken = tuple[int, FdStat] | tuple[int, int]
"""take_leases' answer for a path: (descriptor, its stat) or (errno, stage): 0 open,
1 F_SETSIG, 2 F_SETLEASE, 3 fstat"""


class _Extension(Protocol):
    def create_files(self, jobs: Sequence[Job], threads: int, /) -> Failure | None: ...
    def write_blobs(
        self, jobs: Sequence[BlobJob], threads: int, replace: int, /
    ) -> list[Written | Failed]: ...
    def lstat_paths(self, paths: Sequence[str], threads: int = 1, /) -> list[Stat | int]: ...
    def link_files(self, jobs: Sequence[LinkJob], threads: int = 1, /) -> list[int]: ...
    def open_paths(self, paths: Sequence[str], /) -> list[int]: ...
    def fstat_fds(self, fds: Sequence[int], /) -> list[FdStat]: ...
    def lease_types(self, fds: Sequence[int], /) -> list[int]: ...
    def take_leases(self, paths: Sequence[str], signal: int, /) -> list[Taken]: ...
    def close_fds(self, fds: Sequence[int], /) -> None: ...


def _load() -> tuple[_Extension | None, str]:
    """The compiled module, or None and why not."""
    try:
        from hostd import _fastcopy
    except ImportError as e:
        return None, f"the extension hostd._fastcopy was not built ({e})"
    missing = [
        n
        for n in (
            "create_files",
            "write_blobs",
            "lstat_paths",
            "link_files",
            "open_paths",
            "fstat_fds",
            "close_fds",
        )
        if not hasattr(_fastcopy, n)
    ]
    if missing:  # built from an older native/fastcopy.c
        return None, f"the extension hostd._fastcopy is stale (no {', '.join(missing)})"
    return _fastcopy, ""


_EXT, WHY_NOT_NATIVE = _load()
_NATIVE = _EXT.create_files if _EXT is not None else None
_NATIVE_BLOBS = _EXT.write_blobs if _EXT is not None else None
IMPLEMENTATION = (
    "native" if _EXT is not None and os.environ.get("HOSTD_NATIVE") != "0" else "python"
)


def create_files(jobs: Sequence[Job], paths: Sequence[str] | None = None) -> None:
    """Create every job's file, with the implementation chosen at import (IMPLEMENTATION)."""
    if IMPLEMENTATION == "native":
        native_create_files(jobs, paths)
    else:
        twin_create_files(jobs, paths)


def native_create_files(
    jobs: Sequence[Job], paths: Sequence[str] | None = None, threads: int | None = None
) -> None:
    """The compiled loop (RuntimeError where it was not built); `threads` None: by size."""
    if _NATIVE is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    order: list[int] | None = None
    if threads is None:
        threads, order = spread(jobs)
    failed = _NATIVE(jobs if order is None else [jobs[i] for i in order], threads)
    if failed is not None:
        index, err, _stage, short_by = failed
        if order is not None:
            index = order[index]
        message = _shrank(short_by) if short_by >= 0 else os.strerror(err)
        raise OSError(err, message, _name(jobs, paths, index))


def threads_for(jobs: Sequence[Job]) -> int:
    """The native loop's threads for a batch: one per SPLIT_BYTES, or SMALL_THREADS for many
    small files spread over directories in the order given."""
    by_size = max(1, min(NATIVE_THREADS, sum(max(job[3], 0) for job in jobs) // SPLIT_BYTES))
    if by_size >= SMALL_THREADS or len(jobs) < SMALL_FILES:
        return by_size
    return SMALL_THREADS if _spread_out(jobs) else by_size


def spread(jobs: Sequence[Job]) -> tuple[int, list[int] | None]:
    """threads_for's threads, and the order to give the jobs in (None: as they are). Many
    small files in tree order (a directory's together: a progressive restore's, or the
    placer's batches) would go on one thread; taken instead from SMALL_THREADS shares in
    turn (the first of each, the second of each...), two threads work in two directories at
    once, unless the batch has too few directories for that."""
    threads = threads_for(jobs)
    if threads > 1 or len(jobs) < SMALL_FILES:
        return threads, None
    share = -(-len(jobs) // SMALL_THREADS)
    order = [
        i
        for k in range(share)
        for i in range(k, len(jobs), share)  # (k, share + k, ...)
    ]
    if not _spread_out([jobs[i] for i in order]):
        return threads, None
    return SMALL_THREADS, order


def _spread_out(jobs: Sequence[Job]) -> bool:
    """Whether most files lie in another directory than the one before."""
    dirs = [job[0] for job in jobs]
    moves: int = sum(map(operator.ne, dirs, dirs[1:]))
    return 2 * moves > len(jobs)


def twin_create_files(
    jobs: Sequence[Job], paths: Sequence[str] | None = None, threads: int = TWIN_THREADS
) -> None:
    """The pure-Python loop, on `threads` threads pulling the next job in turn."""
    failed: list[tuple[int, OSError]] = []
    if len(jobs) <= 1 or threads <= 1:
        for i, job in enumerate(jobs):
            try:
                _make(job)
            except OSError as e:
                failed.append((i, e))
                break
    else:
        lock = threading.Lock()
        queue = iter(enumerate(jobs))
        crashed: list[BaseException] = []

        def worker() -> None:
            while True:
                with lock:
                    if failed or crashed:
                        return
                    got = next(queue, None)
                if got is None:
                    return
                i, job = got
                try:
                    _make(job)
                except OSError as e:
                    with lock:
                        failed.append((i, e))
                    return
                except BaseException as e:  # a bad job: re-raised by the caller's thread
                    with lock:
                        crashed.append(e)
                    return

        workers = [threading.Thread(target=worker) for _ in range(min(threads, len(jobs)))]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        if crashed:
            raise crashed[0]
    if failed:
        i, cause = failed[0]
        raise OSError(cause.errno, cause.strerror, _name(jobs, paths, i)) from cause


def _make(job: Job) -> None:
    dfd, leaf, mode, size, src, mtime = job
    fd = os.open(leaf, _FLAGS, 0o600, dir_fd=dfd)
    try:
        if src >= 0:
            copy_range(src, fd, size)
        os.fchmod(fd, mode)
        if mtime is not None:  # the recorded mtime; the atime is set to it too
            os.utime(fd, ns=(mtime, mtime))
    finally:
        os.close(fd)


def _shrank(left: int) -> str:
    """The message fileio.copy_range gives a source that ended `left` bytes early (EIO)."""
    return f"source shrank while copying ({left} bytes short)"


def _name(jobs: Sequence[Job], paths: Sequence[str] | None, index: int) -> str:
    return paths[index] if paths is not None else jobs[index][1]


def write_blobs(jobs: Sequence[BlobJob], *, replace: bool = True) -> list[Written | Failed]:
    """Write every job's blob, with the implementation chosen at import (IMPLEMENTATION).
    `replace` False: a file at a job's destination stays, and fails it (EEXIST, RENAME)."""
    if IMPLEMENTATION == "native":
        return native_write_blobs(jobs, replace=replace)
    return twin_write_blobs(jobs, replace=replace)


def native_write_blobs(
    jobs: Sequence[BlobJob], threads: int = BLOB_THREADS, *, replace: bool = True
) -> list[Written | Failed]:
    """The compiled loop (RuntimeError where it was not built)."""
    if _NATIVE_BLOBS is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    return _NATIVE_BLOBS(jobs, threads, int(replace))


def twin_write_blobs(jobs: Sequence[BlobJob], *, replace: bool = True) -> list[Written | Failed]:
    """The pure-Python loop, on the calling thread."""
    devs: dict[str, int] = {}  # st_dev of each scratch directory (the tier's filesystem)
    return [_write_blob(job, _scratch_dev(job[0], devs), replace) for job in jobs]


def _scratch_dev(scratch: str, devs: dict[str, int]) -> int:
    """st_dev of `scratch`'s directory, 0 where it cannot be had (native: scratch_dev)."""
    parent = scratch.rpartition("/")[0]
    dev = devs.get(parent)
    if dev is None:
        try:
            dev = os.stat(parent).st_dev if parent else 0
        except OSError:
            dev = 0
        devs[parent] = dev
    return dev


STAT_SPLIT = 512


def lstat_paths(paths: Sequence[str]) -> list[Stat | int]:
    """Each path's lstat, or the errno where it failed (IMPLEMENTATION's loop)."""
    return native_lstat_paths(paths) if IMPLEMENTATION == "native" else twin_lstat_paths(paths)


def native_lstat_paths(paths: Sequence[str], threads: int | None = None) -> list[Stat | int]:
    """The compiled loop (RuntimeError where it was not built), on two threads for a batch
    of STAT_SPLIT or more (`threads` None): a stat is ~2.5 µs of path walk, and a warm
    restore of 10,000 files stats every blob before it can start."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    if threads is None:
        threads = 2 if len(paths) >= STAT_SPLIT else 1
    return _EXT.lstat_paths(paths, threads)


def twin_lstat_paths(paths: Sequence[str]) -> list[Stat | int]:
    out: list[Stat | int] = []
    for p in paths:
        try:
            st = os.lstat(p)
        except OSError as e:
            out.append(_errno(e))
        else:
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode))
    return out


def link_files(jobs: Sequence[LinkJob]) -> list[int]:
    """Link each job; the errno of each, 0 where it was linked (IMPLEMENTATION's loop)."""
    return native_link_files(jobs) if IMPLEMENTATION == "native" else twin_link_files(jobs)


def native_link_files(jobs: Sequence[LinkJob], threads: int = LINK_THREADS) -> list[int]:
    """The compiled loop (RuntimeError where it was not built), each of `threads` threads
    linking its share of the jobs in order (one share of a tree's directories each)."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    return _EXT.link_files(jobs, threads)


def twin_link_files(jobs: Sequence[LinkJob]) -> list[int]:
    out: list[int] = []
    for src_dir, rel, dst_dir, name in jobs:
        try:
            os.link(rel, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        except OSError as e:
            out.append(_errno(e))
        else:
            out.append(0)
    return out


def open_paths(paths: Sequence[str]) -> list[int]:
    """Each path opened for reading (IMPLEMENTATION's loop); the first failure raised."""
    return native_open_paths(paths) if IMPLEMENTATION == "native" else twin_open_paths(paths)


def native_open_paths(paths: Sequence[str]) -> list[int]:
    """The compiled loop (RuntimeError where it was not built)."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    return _EXT.open_paths(paths)


def twin_open_paths(paths: Sequence[str]) -> list[int]:
    out: list[int] = []
    try:
        for p in paths:
            out.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in out:
            os.close(fd)
        raise
    return out


def fstat_fds(fds: Sequence[int]) -> list[FdStat]:
    """Each descriptor's fstat (IMPLEMENTATION's loop); the first failure raised."""
    return native_fstat_fds(fds) if IMPLEMENTATION == "native" else twin_fstat_fds(fds)


def native_fstat_fds(fds: Sequence[int]) -> list[FdStat]:
    """The compiled loop (RuntimeError where it was not built)."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    return _EXT.fstat_fds(fds)


def twin_fstat_fds(fds: Sequence[int]) -> list[FdStat]:
    return [fdstat_of(os.fstat(fd)) for fd in fds]


def fdstat_of(st: os.stat_result) -> FdStat:
    return st.st_mode, st.st_uid, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def lease_types(fds: Sequence[int]) -> list[int]:
    """Each descriptor's F_GETLEASE (IMPLEMENTATION's loop): its lease's type (a lease
    being broken answers the type it is to become), or -errno where it failed."""
    return native_lease_types(fds) if IMPLEMENTATION == "native" else twin_lease_types(fds)


def native_lease_types(fds: Sequence[int]) -> list[int]:
    """The compiled loop (RuntimeError where it was not built)."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    return _EXT.lease_types(fds)


def twin_lease_types(fds: Sequence[int]) -> list[int]:
    out = []
    for fd in fds:
        try:
            out.append(fcntl.fcntl(fd, F_GETLEASE))
        except OSError as e:
            out.append(-(e.errno or errno.EIO))
    return out


def take_leases(paths: Sequence[str], signal: int) -> list[Taken]:
    """A read lease on each file, its breaks told by `signal` (IMPLEMENTATION's loop):
    every path tried, one answer each (Taken), in order."""
    if IMPLEMENTATION == "native":
        return native_take_leases(paths, signal)
    return twin_take_leases(paths, signal)


def native_take_leases(paths: Sequence[str], signal: int) -> list[Taken]:
    """The compiled loop (RuntimeError where it was not built)."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    return _EXT.take_leases(paths, signal)


def twin_take_leases(paths: Sequence[str], signal: int) -> list[Taken]:
    out: list[Taken] = []
    try:
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                out.append((e.errno or errno.EIO, 0))
                continue
            stage = 1
            try:
                fcntl.fcntl(fd, F_SETSIG, signal)
                stage = 2
                fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
                stage = 3
                out.append((fd, fdstat_of(os.fstat(fd))))
            except BaseException as e:
                os.close(fd)
                if not isinstance(e, OSError):
                    raise
                out.append((e.errno or errno.EIO, stage))
    except BaseException:
        # (no answer: no lease is kept, as the native loop keeps none where it raises)
        for first, second in out:
            if isinstance(second, tuple):
                os.close(first)
        raise
    return out


def close_fds(fds: Sequence[int]) -> None:
    """Close each descriptor (IMPLEMENTATION's loop); the first failure raised at the end."""
    if IMPLEMENTATION == "native":
        native_close_fds(fds)
    else:
        twin_close_fds(fds)


def native_close_fds(fds: Sequence[int]) -> None:
    """The compiled loop (RuntimeError where it was not built)."""
    if _EXT is None:
        raise RuntimeError(WHY_NOT_NATIVE)
    _EXT.close_fds(fds)


def twin_close_fds(fds: Sequence[int]) -> None:
    failed: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:
            failed = failed or e
    if failed is not None:
        raise failed


def blob_error(job: BlobJob, failed: Failed) -> OSError:
    """A failed job's outcome as the OSError the os module would have raised, naming the
    path the failing call was given (the scratch file, `dest`, or `dest`'s directory) and,
    in its message, the stage."""
    err, stage = failed
    scratch, dest = job[0], job[1]
    path = scratch if stage < RENAME else dest.rpartition("/")[0] if stage == MKDIR else dest
    return OSError(err, f"{os.strerror(err)}, {STAGES[stage]}", path)


# Set once a filesystem refused O_TMPFILE, or a file could not be named through /proc; once
# linkat(AT_EMPTY_PATH) was refused. The native loop keeps its own.
_no_unnamed = False
_no_empty_path = False


def _name_unnamed(fd: int, dest: str) -> None:
    """Give the unnamed file `fd` the name `dest` (native/fastcopy.c, name_unnamed)."""
    global _no_empty_path, _no_unnamed
    if not _no_empty_path:
        try:
            link_fd(fd, dest)
            return
        except (FileNotFoundError, PermissionError):
            _no_empty_path = True
    parent, _, leaf = dest.rpartition("/")
    dfd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:  # (os.link asks linkat to follow /proc's link only where given a dir_fd)
        os.link(f"/proc/self/fd/{fd}", leaf, dst_dir_fd=dfd, follow_symlinks=True)
    except FileNotFoundError:
        if not os.access("/proc/self/fd", os.X_OK):
            _no_unnamed = True
        raise
    finally:
        os.close(dfd)


def _write_unnamed(job: BlobJob, tier_dev: int) -> Written | int | None:
    """The blob as an unnamed file named once whole (native/fastcopy.c, write_unnamed): its
    stat, or None for the scratch way (EEXIST where a file had the name), with nothing of
    this attempt left."""
    global _no_unnamed
    _, dest, data, mtime, mode = job
    parent = dest.rpartition("/")[0]
    if _no_unnamed or not tier_dev or not parent:
        return None
    flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
    made = False
    try:
        try:
            fd = os.open(parent, flags, 0o600)
        except FileNotFoundError:
            try:
                os.mkdir(parent, 0o777)
                made = True
            except FileExistsError:
                pass
            fd = os.open(parent, flags, 0o600)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            _no_unnamed = True
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        return None
    named = False
    taken = False
    try:
        if os.fstat(fd).st_dev != tier_dev:  # a prefix directory leading off the tier
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), parent)
        _pwrite_all(fd, data)
        set_mtime(fd, mtime)
        os.fchmod(fd, mode)
        try:
            _name_unnamed(fd, dest)
        except FileExistsError:
            taken = True
            raise
        named = True
    except OSError:
        pass
    finally:
        try:
            os.close(fd)  # (unnamed, its file goes with it)
        except OSError as e:
            if named and e.errno != errno.EINTR:  # named, but its write-back failed
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                named = False
    st = None
    if named:
        with contextlib.suppress(OSError):  # else the scratch way's rename replaces it
            st = os.stat(dest)
    if st is None:
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        return errno.EEXIST if taken else None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _write_blob(job: BlobJob, tier_dev: int, replace: bool = True) -> Written | Failed:
    written = _write_unnamed(job, tier_dev)
    if isinstance(written, tuple):
        return written
    if written == errno.EEXIST and not replace:
        return errno.EEXIST, RENAME
    scratch, dest, data, mtime, mode = job
    try:
        fd = _open_scratch(scratch)
    except OSError as e:
        return _errno(e), OPEN
    err, stage = 0, WRITE
    try:
        _pwrite_all(fd, data)
        stage = UTIME
        set_mtime(fd, mtime)
        stage = CHMOD
        os.fchmod(fd, mode)
    except OSError as e:
        err = _errno(e)
    except BaseException:  # a bad job (or an interrupt): no scratch file is left behind
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(scratch)
        raise
    try:
        os.close(fd)  # Linux frees the descriptor even when it reports an error
    except OSError as e:
        if not err and e.errno != errno.EINTR:
            err, stage = _errno(e), CLOSE
    if not err:
        err, stage = install_file(scratch, dest, replace)
    if err:
        with contextlib.suppress(OSError):  # best effort: on a read-only tier this fails too
            os.unlink(scratch)
        return err, stage
    try:
        st = os.stat(dest)
    except OSError as e:
        return _errno(e), STAT
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


# What set_mtime takes as "this filesystem cannot hold that time" (a FAT tier and a time
# before 1980, say): the blob keeps the time it was written at, and its files are copied.
_TIME_UNREPRESENTABLE = (errno.EINVAL, errno.EOVERFLOW, errno.ERANGE)


def set_mtime(fd: int, mtime_ns: int | None) -> None:
    """Give a blob the mtime of the file it is installed for (None: a format-1 entry, which
    recorded none; the blob keeps its write time). Before the stat that gets recorded: the
    time is part of what Cache.unchanged checks. (Tier's, and the twin's.)"""
    if mtime_ns is None:
        return
    try:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    except OSError as e:
        if e.errno not in _TIME_UNREPRESENTABLE:
            raise


def _open_scratch(path: str) -> int:
    try:
        return os.open(path, _FLAGS, 0o600)
    except FileExistsError:
        # A leftover of this caller's (its names are its own: pid, thread, batch index).
        os.unlink(path)
        return os.open(path, _FLAGS, 0o600)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")  # lengths in bytes, whatever the view's format
    offset = 0
    while offset < len(view):
        n = os.pwrite(fd, view[offset:], offset)
        if n == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        offset += n


def _put(scratch: str, dest: str, replace: bool) -> None:
    """rename(scratch, dest), or without `replace` link then unlink (a file at dest stays)."""
    if replace:
        os.rename(scratch, dest)
        return
    os.link(scratch, dest)
    os.unlink(scratch)


def install_file(scratch: str, dest: str, replace: bool = True) -> tuple[int, int]:
    """_put(scratch, dest), making dest's directory where it is missing: (0 or errno,
    stage)."""
    try:
        _put(scratch, dest, replace)
        return 0, RENAME
    except FileNotFoundError:  # the first blob of its prefix: one syscall otherwise
        pass
    except OSError as e:
        return _errno(e), RENAME
    parent = dest.rpartition("/")[0]
    if not parent:
        return errno.ENOENT, RENAME
    try:
        os.mkdir(parent, 0o777)
    except FileExistsError:
        pass
    except OSError as e:
        return _errno(e), MKDIR
    try:
        _put(scratch, dest, replace)
    except OSError as e:
        return _errno(e), RENAME
    return 0, RENAME


def _errno(e: OSError) -> int:
    return e.errno if e.errno is not None else errno.EIO

"""The one place that turns a manifest and complete blobs into a directory tree.

Everything in the caller's filesystem is done by the helper that holds the caller's rights
(asuser.py / fsops.py): it makes a hidden build directory beside the target, the tree's
directories, copies and empty files, symlinks, and renames the build into place, so a target
either does not exist, or is the previous tree, or is the complete new tree, and a tree lands
only where the caller could have made it. The daemon does one thing itself: it hardlinks its
read-only blobs (`link`: O(files)) into directories the helper made and handed over as
descriptors (under fs.protected_hardlinks only the blob's owner may link it).

Every file gets the mtime its manifest records (format 2). A file is copied rather than
linked when linking would show the wrong mode (only read-only files match a blob's 0444) or
the wrong mtime (a linked file is the blob's inode, shared by every restore of it: it keeps
the mtime of the file it was stored for, and is never re-timed with utimensat), when the blob
is at the link limit (EMLINK), on another mount (EXDEV, bind mounts of one filesystem
included), or when linking is not allowed for this caller (`link_ok`); an empty file is
created.

Runs in a worker thread (blocking I/O). A `threading.Event` lets the async caller stop it
between batches; the helper then removes what it built and never renames.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import posixpath
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hostd.asuser import AsUser
from hostd.core import manifest as mf
from hostd.errors import ChunkCorrupt, UsageError
from hostd.fastcopy import LinkJob, link_files
from hostd.tier import BLOB_MODE

MODES = ("link", "copy", "auto")
# Copies per request to the helper: a round trip (JSON, the blobs' descriptors) costs about
# as much as copying 64 small files, so a tree of small files goes in large batches.
BATCH_FILES = 512
BATCH_BYTES = 1 << 30
# Links per native call (fastcopy.link_files): a cancel is seen between two.
LINK_BATCH = 1024
# Where a link fails with one of these, the file is copied instead: the blob is at its link
# limit, on another mount, or protected_hardlinks refuses it; ENOENT: the blob went.
_COPY_INSTEAD = frozenset({errno.EMLINK, errno.EXDEV, errno.EPERM, errno.ENOENT})


class Cancelled(Exception):
    """The caller gave up; what was built is removed."""


@dataclass(frozen=True, slots=True)
class Outcome:
    linked: int
    copied: int
    created: int
    linked_digests: frozenset[bytes] = field(default_factory=frozenset)
    mtime_copies: int = 0  # copied, not linked, because the blob has another file's mtime
    old_tree_left: str | None = None
    mode_copies: int = 0  # copied, not linked, for a mode a 0444 blob cannot show (exec bits)
    limit_copies: int = 0  # copied, not linked, because the blob is at its link limit


def materialize(
    m: mf.Manifest,
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    *,
    mode: str,
    replace: bool,
    link_ok: bool,
    cancel: threading.Event,
    on_file: Callable[[int], None] | None = None,
    lent: Callable[[bytes], bool] = lambda _: False,
    blob_mtime: Callable[[bytes], int | None] = lambda _: None,
) -> Outcome:
    """Build `m` through `fs` (whose `target` was already resolved) and rename it in.
    `blob_path(digest)`: the blob's file, `<tier>/blobs/<xx>/<hex>` (a string: Path objects
    cost more than the link itself, per file); `lent(digest)`: whether a caller that can
    write to that blob holds a link to it; `blob_mtime(digest)`: the mtime its inode has."""
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    try:
        out = _build(m, fs, blob_path, mode, link_ok, cancel, on_file, lent, blob_mtime)
        if cancel.is_set():
            raise Cancelled()
        left = fs.commit(replace)
    except BaseException:
        fs.abandon()
        raise
    return dataclasses.replace(out, old_tree_left=left)


def _dirs(m: mf.Manifest) -> list[str]:
    """Every directory of the tree, parents before children."""
    out: set[str] = set()
    parents = [
        posixpath.dirname(p) for p in [*(f.path for f in m.files), *(s.path for s in m.symlinks)]
    ]
    for d in [*parents, *m.dirs]:
        while d and d not in out:  # a directory already seen brought its parents along
            out.add(d)
            d = posixpath.dirname(d)
    return sorted(out, key=lambda d: (d.count("/"), d))


def _build(
    m: mf.Manifest,
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    mode: str,
    link_ok: bool,
    cancel: threading.Event,
    on_file: Callable[[int], None] | None,
    lent: Callable[[bytes], bool],
    blob_mtime: Callable[[bytes], int | None],
) -> Outcome:
    candidates: list[mf.FileEntry] = []
    copies: list[mf.FileEntry] = []
    mtime_copies = mode_copies = limit_copies = 0
    for f in m.files:
        if not f.size:
            continue
        linkable = mode != "copy" and link_ok and (f.mode & 0o555) == BLOB_MODE
        if mode != "copy" and link_ok and not linkable:
            mode_copies += 1
        if linkable and f.mtime is not None and blob_mtime(f.digest) != f.mtime:
            linkable = False
            mtime_copies += 1
        (candidates if linkable else copies).append(f)
    want = sorted({posixpath.dirname(f.path) for f in candidates})
    dev, dirfds = fs.begin(_dirs(m), want)
    linked: set[bytes] = set()
    n_linked = 0
    views = _Views(fs)
    try:
        owned = {d: _caller_dir(fd, fs.caller.uid) for d, fd in dirfds.items()}
        jobs: list[LinkJob] = []
        linking: list[mf.FileEntry] = []
        for f in candidates:
            sub, _, name = blob_path(f.digest).rpartition("/")
            blobs_dir, _, shard = sub.rpartition("/")
            d, _, leaf = f.path.rpartition("/")
            view, view_dev = views.of(blobs_dir)
            if view < 0 or view_dev != dev or not owned[d]:
                if mode == "link":  # links or fails: never a quiet copy of the tree
                    raise _cannot_link(f, "the caller cannot see the blob's tier there")
                copies.append(f)
                continue
            jobs.append((view, f"{shard}/{name}", dirfds[d], leaf))
            linking.append(f)
        # Each link: a blob, named below a blob directory checked above (nothing below it
        # is the caller's: it is hostd's, 0700), into a directory the helper made; no
        # symlink is followed.
        for i in range(0, len(jobs), LINK_BATCH):
            if cancel.is_set():
                raise Cancelled()
            done = link_files(jobs[i : i + LINK_BATCH])
            for f, err in zip(linking[i : i + LINK_BATCH], done, strict=True):
                if err == 0:
                    linked.add(f.digest)
                    n_linked += 1
                    if on_file is not None:
                        on_file(f.size)
                elif mode == "link" and err in (errno.EXDEV, errno.EPERM):
                    raise _cannot_link(f, os.strerror(err))
                elif err in _COPY_INSTEAD:
                    limit_copies += err == errno.EMLINK
                    copies.append(f)
                else:
                    raise OSError(err, os.strerror(err), f.path)
    finally:
        views.close()
        for fd in dirfds.values():
            os.close(fd)
    empties = [f for f in m.files if not f.size]
    if empties:
        fs.files([(f.path, f.mode, 0, "empty", f.mtime) for f in empties], [])
        if on_file is not None:
            for _ in empties:
                on_file(0)
    _copy_all(copies, fs, blob_path, cancel, on_file, lent)
    if m.symlinks:
        fs.symlinks((s.path, s.target) for s in m.symlinks)
    return Outcome(
        n_linked,
        len(copies),
        len(empties),
        frozenset(linked),
        mtime_copies=mtime_copies,
        mode_copies=mode_copies,
        limit_copies=limit_copies,
    )


def _cannot_link(f: mf.FileEntry, why: str) -> UsageError:
    return UsageError(
        f"field 'mode': cannot link {f.path!r} into the target ({why}); "
        "use --mode auto to copy what cannot be linked"
    )


def _caller_dir(fd: int, uid: int) -> bool:
    """A directory descriptor from the helper really is a directory the caller owns: a
    helper that lied could otherwise have the daemon link blobs anywhere."""
    st = os.fstat(fd)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


def _copy_all(
    copies: list[mf.FileEntry],
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    cancel: threading.Event,
    on_file: Callable[[int], None] | None,
    lent: Callable[[bytes], bool],
) -> None:
    """Copies go to the helper in batches, each with the blobs' descriptors: the helper
    writes them as the caller. Largest first, so one big file does not finish last alone.
    While the helper creates one batch, this thread opens the next one's blobs (a second
    thread waits for the helper's answer): the two halves of a small file's cost overlap.

    A blob lent to a writer (link_to_writers) may be written through a link while it is
    copied: its state is compared before and after, and a copy that saw it move is not
    handed over (the restore fails; the next use re-hashes the blob)."""
    copies.sort(key=lambda f: -f.size)
    batches: list[list[mf.FileEntry]] = []
    i = 0
    while i < len(copies):
        batch: list[mf.FileEntry] = []
        size = 0
        while i < len(copies) and len(batch) < BATCH_FILES and (not batch or size < BATCH_BYTES):
            batch.append(copies[i])
            size += copies[i].size
            i += 1
        batches.append(batch)
    if not batches:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hostd-copy") as sender:
        sent: _Sent | None = None
        try:
            for batch in batches:
                if cancel.is_set():
                    raise Cancelled()
                opened = _open_batch(batch, blob_path, lent)
                items = [(f.path, f.mode, f.size, "copy", f.mtime) for f in batch]
                try:
                    job = sender.submit(fs.files, items, opened.fds)
                except BaseException:
                    opened.close()
                    raise
                last, sent = sent, _Sent(opened, job)
                if last is not None:
                    last.finish(on_file)
            last, sent = sent, None
            if last is not None:
                last.finish(on_file)
        finally:
            if sent is not None:  # a failure while it was out: wait for its answer, quietly
                concurrent.futures.wait([sent.job])
                sent.opened.close()


@dataclass
class _Opened:
    """A batch of copies with its blobs opened, and the state of the lent ones."""

    batch: list[mf.FileEntry]
    fds: list[int]
    watched: dict[int, tuple[mf.FileEntry, tuple[int, int, int]]]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _open_batch(
    batch: list[mf.FileEntry], blob_path: Callable[[bytes], str], lent: Callable[[bytes], bool]
) -> _Opened:
    opened = _Opened(batch, [], {})
    try:
        for f in batch:
            opened.fds.append(os.open(blob_path(f.digest), os.O_RDONLY | os.O_CLOEXEC))
        for f, fd in zip(batch, opened.fds, strict=True):
            if lent(f.digest):
                opened.watched[fd] = (f, _state(fd))
    except BaseException:
        opened.close()
        raise
    return opened


@dataclass
class _Sent:
    """A batch the helper is creating."""

    opened: _Opened
    job: concurrent.futures.Future[None]

    def finish(self, on_file: Callable[[int], None] | None) -> None:
        """Wait for the helper's answer, check the lent blobs did not move meanwhile."""
        try:
            self.job.result()
            for fd, (f, before) in self.opened.watched.items():
                if _state(fd) != before:
                    raise ChunkCorrupt(
                        f"blob {f.digest.hex()} ({f.path!r}) was written to through a link "
                        "while it was copied; try the restore again"
                    )
        finally:
            self.opened.close()
        if on_file is not None:
            for f in self.opened.batch:
                on_file(f.size)


def _state(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Views:
    """The tiers' blob directories as the caller's mount namespace sees them, opened once
    per restore and checked to be the daemon's own (same device and inode). A link from
    one stays on one mount with the caller's directories: a link never crosses mounts, and
    a daemon under systemd has mounts of its own. A blob directory the caller cannot see
    (a container without the tier) gives -1: its files are copied."""

    def __init__(self, fs: AsUser) -> None:
        self.fs = fs
        self.fds: dict[str, tuple[int, int]] = {}

    def of(self, blobs_dir: str) -> tuple[int, int]:
        """(descriptor or -1, st_dev) of `blobs_dir` in the caller's view."""
        got = self.fds.get(blobs_dir)
        if got is None:
            mine = os.stat(blobs_dir)
            fd = self.fs.open_in_view(blobs_dir)
            if fd >= 0:
                theirs = os.fstat(fd)
                if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
                    os.close(fd)  # something else sits at that path in the caller's view
                    fd = -1
            got = self.fds[blobs_dir] = (fd, mine.st_dev)
        return got

    def close(self) -> None:
        for fd, _ in self.fds.values():
            if fd >= 0:
                os.close(fd)
        self.fds.clear()

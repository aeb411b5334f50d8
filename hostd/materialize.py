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

Runs in a worker thread (blocking I/O), with a few threads of its own: copies go to the
helper from one while this one links, and each batch of copies is sent from a thread of its
own while the helper still creates the one before (`AsUser.call` pipelines them), so the
helper, which does most of the work, never waits on a round trip. The blobs are opened,
checked and closed a batch at a time in C (fastcopy), never a file at a time in Python: a
loop of os calls gives the GIL up and takes it back at every file, which the daemon's other
threads make slow. A `threading.Event` lets the async caller stop it between batches; the
helper then removes what it built and never renames.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import operator
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from hostd.asuser import AsUser
from hostd.core import manifest as mf
from hostd.core.ids import verify_chunk
from hostd.errors import BlobMoved, ChunkCorrupt, HostdError, TargetError, UsageError, os_cause
from hostd.fastcopy import FdStat, LinkJob, close_fds, fstat_fds, link_files, open_paths
from hostd.fileio import copy_range, writing_as
from hostd.tier import BLOB_MODE, EXEC_BLOB_MODE, digest_of, pread_into, pwrite_all

log = logging.getLogger(__name__)

MODES = ("link", "copy", "auto")
# Copies per request to the helper: a request (JSON, the blobs' descriptors) costs about as
# much as copying 64 small files, so a tree of small files goes in large batches.
BATCH_FILES = 512
BATCH_BYTES = 1 << 30
# A small first batch: the helper starts on it while the next is opened.
FIRST_FILES = 64
# Batches sent beyond the one the helper is creating: it finds the next on its socket, and
# the daemon has that long to send another (its threads share the GIL with the others).
AHEAD = 2
# Links per native call (fastcopy.link_files): a cancel is seen between two.
LINK_BATCH = 1024
# Where a link fails with one of these, the file is copied instead: the blob is at its link
# limit, on another mount, or protected_hardlinks refuses it; ENOENT: the blob went.
_COPY_INSTEAD = frozenset({errno.EMLINK, errno.EXDEV, errno.EPERM, errno.ENOENT})
_SIZE = operator.attrgetter("size")


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
    mode_copies: int = 0  # copied, not linked, for a mode its blob cannot show
    limit_copies: int = 0  # copied, not linked, because the blob is at its link limit


State = tuple[int, int, int]
"""A blob file's (size, mtime_ns, ctime_ns)."""


_state: Callable[[FdStat], State] = operator.itemgetter(4, 5, 6)


@dataclass(frozen=True)
class Watch:
    """Which copies a restore checks before it hands them over, against a write through a
    link while, or just before, their blob was read (a link hands out the cache's inode).

    Watched: a blob lent to a writer (`lent`, now), or, with `every`, any blob (`[access]
    link_checks = "lease"`: a root process that reaches a non-writer's link can write it).
    A watched blob's state as its copy's batch was opened must be the state its bytes were
    last verified in (`recorded`: the restore's check made the record show it), and the
    same once the copy is made; a write moves the ctime. A copy whose blob moved, or whose
    blob's read lease broke since the restore began (`broken`: a break is recorded before
    the writer may go on, whatever the clock's grain, unless the kernel broke it itself:
    leases.py), is read back as the caller and
    handed over only if it hashes right. Where a lease on the blob, vouched for, holds on
    that very inode now (`held`: its number, and the inode's state at its take), and held
    as the batch was opened, or was taken since in the state the blob had then, no one
    wrote it meanwhile: a ctime moved by links alone (another restore's, this one's) costs
    no read back. (One taken since on a blob that moved meanwhile vouches for nothing
    before its take: a write then, undone before a re-hash took it, was read by the
    copy.)"""

    lent: Callable[[bytes], bool] = lambda _: False
    every: bool = False
    # Of a batch's blobs, as it is opened: each one's verified state, and its lease's number
    # (if one was taken; whether it held then, and on that inode, the finish asks only
    # where the blob moved: the same lease holding then held throughout). No system call.
    recorded: Callable[[Sequence[bytes]], tuple[list[State | None], list[int | None]]] = (
        lambda digests: ([None] * len(digests), [None] * len(digests))
    )
    broken: Callable[[Sequence[bytes]], set[bytes]] = lambda _: set()
    held: Callable[[bytes, int, int], tuple[int, State] | None] = lambda _d, _dev, _ino: None

    def watched(self, digest: bytes) -> bool:
        return self.every or self.lent(digest)

    def opened(
        self, digests: Sequence[bytes]
    ) -> tuple[list[bool], list[State | None], list[int | None]]:
        """Of a batch as it is opened: whether each blob is watched, and what `recorded`
        says of those that are (None for the others)."""
        if self.every:
            return [True] * len(digests), *self.recorded(digests)
        watched = [self.lent(d) for d in digests]
        states: list[State | None] = [None] * len(digests)
        numbers: list[int | None] = [None] * len(digests)
        at = [i for i, w in enumerate(watched) if w]
        if at:
            got = self.recorded([digests[i] for i in at])
            for j, i in enumerate(at):
                states[i], numbers[i] = got[0][j], got[1][j]
        return watched, states, numbers

    def moved(
        self,
        files: Sequence[mf.FileEntry],
        before: Sequence[FdStat],
        verified: Sequence[State | None],
        held: Sequence[int | None],
        after: Sequence[FdStat],
    ) -> list[int]:
        """Of the copies of watched blobs `files` (each blob's state as its batch was opened,
        its record's verified state then, the lease held on it then, its state once
        copied), those to read back."""
        broken = self.broken([f.digest for f in files])
        if not broken and after == before and list(map(_state, before)) == verified:
            return []  # (a batch no one touched: compared in C)
        out = []
        for i, f in enumerate(files):
            b = before[i]
            if f.digest not in broken and (
                (after[i] == b and verified[i] in (None, _state(b)))
                or self._held_throughout(f.digest, b, held[i])
            ):
                continue
            out.append(i)
        return out

    def _held_throughout(self, digest: bytes, before: FdStat, then: int | None) -> bool:
        """Whether a lease vouched for holds on the inode `before` is the stat of, and held
        as it was taken (lease `then`), or was taken since with the inode as it was then."""
        now = self.held(digest, before[2], before[3])
        return now is not None and (now[0] == then or now[1] == _state(before))


def materialize(
    m: mf.Manifest,
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    *,
    mode: str,
    replace: bool,
    link_ok: bool,
    cancel: threading.Event,
    on_files: Callable[[list[mf.FileEntry]], object] | None = None,
    watch: Watch | None = None,
    blob_mtime: Callable[[bytes], int | None] = lambda _: None,
    blob_mode: Callable[[bytes], int] = lambda _: BLOB_MODE,
) -> Outcome:
    """Build `m` through `fs` (whose `target` was already resolved) and rename it in.
    `blob_path(digest)`: the blob's file, `<tier>/blobs/<xx>/<hex>` (a string: Path objects
    cost more than the link itself, per file); `watch`: which copies are checked against
    a write through a link (none where not given); `blob_mtime(digest)` and
    `blob_mode(digest)`: the mtime and mode its inode has."""
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    try:
        watch = watch or Watch()
        out = _build(
            m, fs, blob_path, mode, link_ok, cancel, on_files, watch, blob_mtime, blob_mode
        )
        if cancel.is_set():
            raise Cancelled()
        left = fs.commit(replace)
    except BaseException:
        fs.abandon()
        raise
    return dataclasses.replace(out, old_tree_left=left)


@dataclass(frozen=True, slots=True)
class Ready:
    """A blob complete and verified, as a progressive restore places its files from it."""

    digest: bytes
    path: str  # the blob's file
    lent: Callable[[], bool]  # whether a caller that could write it holds a link, now
    mtime: int | None  # its inode's mtime (ns)
    mode: int = BLOB_MODE  # its inode's (tier.mode_of: BLOB_MODE or EXEC_BLOB_MODE, if ours)


# Chunks written into files before they land: [(path, scratch name, offset, length, size)].
OnRange = Callable[[list[tuple[str, str, int, int, int]]], object]


@dataclass(eq=False)  # (one part is itself alone: lists of them are searched by identity)
class _Part:
    """A file of a progressive restore written a verified range at a time (`Placer.tee`),
    under a scratch name, until its blob is complete and it lands."""

    entry: mf.FileEntry
    name: str  # its scratch name, relative to the target
    fd: int  # open for writing (the helper made it, as the caller)
    uid: int  # the caller's: whose writes these are (fileio.writing_as)
    written: set[int] = field(default_factory=set)  # the offsets of the chunks written
    error: OSError | None = None  # a write that failed: told when it would land
    closed: bool = False  # landed or given up: fd is closed (its number may be another's)
    writing: int = 0  # writes under way: fd is closed only once none is
    lock: threading.Condition = field(default_factory=threading.Condition)

    def write(self, offset: int, data: bytes | memoryview) -> bool:
        """Write a chunk at `offset` (chunks of one file are written at once, from several
        fill threads); whether it was. A failure is kept, and told when the file lands."""
        with self.lock:
            if self.closed or self.error is not None or offset in self.written:
                return False
            self.writing += 1
        try:
            with writing_as(self.uid):
                pwrite_all(self.fd, data, offset)
        except OSError as e:
            self.error = e
            return False
        else:
            with self.lock:
                self.written.add(offset)
            return True
        finally:
            with self.lock:
                self.writing -= 1
                self.lock.notify_all()

    def close(self) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.writing == 0)
            if not self.closed:
                self.closed = True
                os.close(self.fd)


# The bytes of verified chunks a restore's ranges may hold, waiting for their writes into
# the caller's files; a chunk past that is not written by range (it is copied in when its
# file lands, as a chunk the fill did not fetch is).
TEE_BYTES = 64 << 20
# The name of the threads that write ranges into callers' files (_Tees): those a caller's
# filesystem may hold in the kernel for as long as its server likes.
RANGES_THREAD = "hostd-ranges"


class _Tees:
    """The writes of a progressive restore's ranges, on a thread of the restore's own: the
    fill hands each verified chunk over (a copy where its buffer may be reused) and goes on. A
    caller whose filesystem blocks a write (a FUSE server that never answers) stalls this
    restore's ranges alone, never the fill's threads, which every restore shares with the
    daemon's other work. Daemonic: a write stuck in the kernel does not hold up an exit."""

    def __init__(self, on_range: OnRange | None) -> None:
        self.on_range = on_range
        self.lock = threading.Condition()
        self.queue: collections.deque[tuple[list[_Part], int, bytes | memoryview]] = (
            collections.deque()
        )
        self.held = 0  # bytes queued
        self.busy: list[_Part] = []  # the parts of the write under way
        self.stopped = False
        self.thread: threading.Thread | None = None

    def put(self, parts: list[_Part], offset: int, data: bytes | memoryview) -> None:
        with self.lock:
            if self.stopped or self.held + len(data) > TEE_BYTES:
                return  # copied when its file lands
            self.queue.append((parts, offset, _kept(data)))
            self.held += len(data)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=RANGES_THREAD, daemon=True)
                self.thread.start()
            self.lock.notify_all()

    def _run(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: bool(self.queue) or self.stopped)
                if self.stopped:
                    return
                parts, offset, data = self.queue.popleft()
                self.busy = parts
            try:
                told = [
                    (p.entry.path, p.name, offset, len(data), p.entry.size)
                    for p in parts
                    if p.write(offset, data)
                ]
                if told and self.on_range is not None:
                    self.on_range(told)
            finally:
                with self.lock:
                    self.held -= len(data)
                    self.busy = []
                    self.lock.notify_all()

    def settle(self, part: _Part) -> None:
        """Until no write into `part` waits or runs (its file is about to land)."""
        with self.lock:
            self.lock.wait_for(
                lambda: all(part not in ps for ps, _, _ in self.queue) and part not in self.busy
            )

    def stop(self) -> None:
        """Drop the writes not started (the parts are being given up)."""
        with self.lock:
            self.stopped = True
            self.held -= sum(len(d) for _, _, d in self.queue)
            self.queue.clear()
            self.lock.notify_all()


def _kept(data: bytes | memoryview) -> bytes | memoryview:
    """`data` as it may be held after its caller returns: bytes and read-only views of bytes
    as they are (nothing can change them), anything else copied (a buffer the fill reuses)."""
    if type(data) is bytes:
        return data
    if isinstance(data, memoryview) and data.readonly and type(data.obj) is bytes:
        return data
    return bytes(data)


class Placer:
    """A progressive restore: the target directory exists from `begin`, and each file lands
    in it, whole (a scratch name renamed in, or a link of the complete blob), as soon as its
    blob is ready. The fill announces each blob (`ready`, from the loop's thread) and says
    when there are no more (`end`); `run`, on a thread of its own, places what is announced,
    a batch at a time (all that is waiting, so a burst of small blobs goes in one request),
    calling `on_files` in the order the files landed. A failure or a cancel removes what was
    placed, unless `keep`.

    `progressive=False` places the same way into the hidden build directory that
    `materialize` uses, renamed into place (`replace` as there) once every file is in: a
    cold restore that is not progressive still writes each file while the rest is fetched,
    and the target is still either the old tree or the whole new one."""

    def __init__(
        self,
        m: mf.Manifest,
        fs: AsUser,
        *,
        mode: str,
        link_ok: bool,
        cancel: threading.Event,
        on_files: Callable[[list[mf.FileEntry]], object],
        lend: Callable[[list[bytes]], None] | None = None,
        keep: bool = False,
        on_symlinks: Callable[[list[mf.Symlink]], object] | None = None,
        progressive: bool = True,
        replace: bool = False,
        watch: Watch | None = None,
    ) -> None:
        """`lend(digests)`: mark the blobs lent (and wait for the mark) before they are
        linked: the caller could write to them. `on_symlinks`: the symlinks, once made
        (last, every file they may point at placed). `watch`: which copies are checked
        against a write through a link (where not given, those of the blobs announced lent)."""
        if mode not in MODES:
            raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.m, self.fs, self.mode, self.link_ok = m, fs, mode, link_ok
        self.cancel, self.lend, self.keep = cancel, lend, keep
        self.on_symlinks = on_symlinks
        self.progressive, self.replace = progressive, replace
        self.watch = watch or Watch(lent=lambda d: self._seen[d].lent())
        self.done = _Done(on_files)
        self.files: dict[bytes, list[mf.FileEntry]] = collections.defaultdict(list)
        for f in m.files:
            if f.size:
                self.files[f.digest].append(f)
        self.waiting: queue.SimpleQueue[list[Ready] | None] = queue.SimpleQueue()
        self.dev = -1
        self.dirfds: dict[str, int] = {}
        self.links = _Links()
        self.linked: list[tuple[str, bytes]] = []  # (path, digest) of each link made
        self.copied = self.mtime_copies = self.mode_copies = 0
        self._seen: dict[bytes, Ready] = {}  # the blobs announced, by digest
        self._sender: _Sender  # (run's, from its start)
        # Files written by range (by_ranges), by blob; who hears of each range.
        self.ranged: list[str] = []
        self.parts: dict[bytes, list[_Part]] = {}
        self._tees = _Tees(None)

    def by_ranges(self, paths: Sequence[str], on_range: OnRange) -> None:
        """Write these files (of several chunks each) a verified chunk at a time as the fill
        hands them to `tee`, under scratch names made by `begin`, each landing whole when
        its blob is complete: `on_range` hears of each chunk written ([(path, scratch name,
        offset, length, the file's size)]), from the fill's thread. Progressive restores
        only; before begin."""
        if not self.progressive:
            raise UsageError("files written by range are for a progressive restore")
        self.ranged, self._tees = list(paths), _Tees(on_range)

    def begin(self) -> None:
        """Make the target and its directories, and the empty files. Blocking."""
        # where links may go: every directory, the top one ("") included
        linked_dirs = [] if self.mode == "copy" or not self.link_ok else ["", *_dirs(self.m)]
        try:
            self.dev, self.dirfds = self.fs.begin(
                _dirs(self.m), linked_dirs, progressive=self.progressive, keep=self.keep
            )
        except BaseException:
            if self.fs.ledger is not None:
                # It holds the target, and failed making the tree's directories: what it made
                # (the ledger says) is taken back, by a successor should it not answer.
                self._failed([])
            raise
        empties = [f for f in self.m.files if not f.size]
        try:
            if empties:
                self.fs.files(_empty_items(empties), [])
                self.done.add(empties)
            if self.ranged:
                self._make_parts()
        except BaseException:
            self._close_parts()
            self._failed([])  # (run, which would, is not called then)
            raise

    def _make_parts(self) -> None:
        entries = {f.path: f for f in self.m.files}
        names, fds = self.fs.parts(self.ranged)
        for path, name, fd in zip(self.ranged, names, fds, strict=True):
            f = entries[path]
            self.parts.setdefault(f.digest, []).append(_Part(f, name, fd, self.fs.caller.uid))

    def tee(self, digest: bytes, offset: int, data: bytes | memoryview) -> None:
        """A verified chunk of blob `digest` at `offset`, as the fill writes it (on its
        thread): to be written into each file of that blob written by range, then told, on
        this restore's own thread (_Tees). Never blocks on the caller's filesystem, never
        raises: a failed write (the target's filesystem full) is told when the file would
        land, and the fill, which other restores may share, goes on."""
        parts = self.parts.get(digest)
        if parts:
            self._tees.put(list(parts), offset, data)

    def _close_parts(self) -> None:
        """The descriptors of the parts not landed closed, no tee writing them (the helper
        removes those files)."""
        self._tees.stop()
        for parts in list(self.parts.values()):
            for p in parts:
                p.close()
        self.parts.clear()

    def ready(self, rs: list[Ready]) -> None:
        """Blobs complete: their files go in next. Any thread; a repeat is ignored."""
        self.waiting.put(rs)

    def end(self) -> None:
        """No more blobs will come: `run` returns once it has placed what came."""
        self.waiting.put(None)

    def run(self) -> Outcome:
        """Place files as their blobs are announced, until `end`; then the symlinks. On any
        failure (or `cancel`) the helper removes what was placed, unless `keep`."""
        seen = self._seen
        sender = self._sender = _Sender(
            self.fs,
            self.cancel.is_set,
            self.done,
            self.watch,
            on_moved=self._moved if self.progressive else None,
        )
        try:
            ended = False
            pending: collections.deque[Ready] = collections.deque()  # announced, not placed
            while True:
                sender.told()
                # What was announced, waiting for more (what is out told first) only when
                # nothing is
                while not ended and len(pending) < BATCH_FILES:
                    try:
                        item = self.waiting.get_nowait()
                    except queue.Empty:
                        if pending:
                            break
                        sender.drain()
                        item = self.waiting.get()
                    if item is None:
                        ended = True
                    else:
                        pending.extend(item)
                batch: list[Ready] = []
                while pending and len(batch) < BATCH_FILES:
                    r = pending.popleft()
                    if r.digest not in seen and r.digest in self.files:
                        seen[r.digest] = r
                        batch.append(r)
                if self.cancel.is_set():
                    raise Cancelled()
                if batch:
                    self._place(batch, seen)
                elif ended and not pending:
                    break
            sender.drain()
            if self.m.symlinks:
                self.fs.symlinks((s.path, s.target) for s in self.m.symlinks)
                if self.on_symlinks is not None:
                    self.on_symlinks(list(self.m.symlinks))
            left = self.fs.commit(self.replace)
        except BaseException:
            sender.settle(tell=self.progressive)  # before the helper takes back
            self._failed(self._linked(seen))
            raise
        finally:
            sender.close()
            self._close_parts()
            close_fds(list(self.dirfds.values()))
            self.dirfds = {}
        return Outcome(
            self.links.n,
            self.copied,
            sum(1 for f in self.m.files if not f.size),
            frozenset(self.links.digests),
            mtime_copies=self.mtime_copies,
            mode_copies=self.mode_copies,
            limit_copies=self.links.limit_copies,
            old_tree_left=left,
        )

    def _failed(self, linked: list[tuple[str, int]]) -> None:
        """Take back what was placed (the helper aborts; where it is dead, a new one: see
        AsUser.abandon). Our copies of the tree's directories are closed first: they share
        the helper's lock on the target, which a new helper must be able to take."""
        close_fds(list(self.dirfds.values()))
        self.dirfds = {}
        self.fs.abandon(linked)

    def links_made(self) -> list[tuple[str, int]]:
        """(path, inode) of each link made (blocking: a stat each)."""
        return self._linked(self._seen)

    def _linked(self, seen: dict[bytes, Ready]) -> list[tuple[str, int]]:
        """(path, inode) of each link made, for the helper to take back."""
        out = []
        for path, digest in self.linked:
            with contextlib.suppress(OSError):
                out.append((path, os.stat(seen[digest].path).st_ino))
        return out

    def _place(self, batch: list[Ready], seen: dict[bytes, Ready]) -> None:
        if self.parts:
            ranged = [(r, p) for r in batch for p in self.parts.get(r.digest, ())]
            if ranged:
                self._land(ranged)
                done = {p.entry.path for _, p in ranged}
                files = [f for r in batch for f in self.files[r.digest] if f.path not in done]
                self._place_files(files, seen)
                return
        self._place_files([f for r in batch for f in self.files[r.digest]], seen)

    def _land(self, ranged: list[tuple[Ready, _Part]]) -> None:
        """Files written by range whose blobs are complete: the chunks no tee wrote (a blob
        found already filled, or resumed, or filled by another restore, or dropped past
        TEE_BYTES) copied from the blob, then each lands whole. Every tee of those blobs
        has been handed over (a blob is complete only once each of its chunks' tier writes
        has), and its writes are waited for (settle)."""
        for r, p in ranged:
            self._tees.settle(p)
            with p.lock:
                if p.error is None:
                    try:
                        self._fill_part(r, p)
                    except OSError as e:
                        p.error = e
                if p.error is not None:
                    raise TargetError(f"writing {p.entry.path!r} in the target: {p.error}")
        try:
            self.fs.land([(p.entry.path, p.entry.mode, p.entry.mtime) for _, p in ranged])
        finally:
            for r, p in ranged:
                p.close()
                self.parts[r.digest].remove(p)
                if not self.parts[r.digest]:
                    del self.parts[r.digest]
        self.copied += len(ranged)
        self.done.add([p.entry for _, p in ranged])

    def _fill_part(self, r: Ready, p: _Part) -> None:
        """Copy into part `p` the chunks of its blob (`r`) that no tee wrote (its lock held).
        A lent blob's bytes (a caller could write them) are hashed against their chunk ids
        as copied. One watched (lent meanwhile; any under leases) that moved (Watch.moved:
        a write through a link moves its ctime, and so does the link another restore made)
        is copied again, hashed so: what lands is verified whatever the blob did meanwhile,
        and a link alone no longer fails the restore (a progressive one is not built again)."""
        step = self.m.chunk_size
        missing = [(i, c) for i, c in enumerate(p.entry.chunks) if i * step not in p.written]
        if not missing:
            return
        check = r.lent()
        src = os.open(r.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            w = self.watch
            before = fstat_fds([src])
            verified, held = w.recorded([r.digest])
            with writing_as(p.uid):
                self._copy_chunks(src, p, missing, check)
                if (
                    not check
                    and w.watched(r.digest)
                    and w.moved([p.entry], before, verified, held, fstat_fds([src]))
                ):
                    log.info(
                        "file %r: its blob moved while it was copied: "
                        "copied again, each chunk hashed",
                        p.entry.path,
                    )
                    self._copy_chunks(src, p, missing, True)
        finally:
            os.close(src)

    def _copy_chunks(
        self, src: int, p: _Part, missing: list[tuple[int, mf.Chunk]], check: bool
    ) -> None:
        step = self.m.chunk_size
        for i, c in missing:
            at = i * step
            if check:
                buf = bytearray(c.size)
                pread_into(src, memoryview(buf), at)
                if not verify_chunk(c.id, buf):
                    raise ChunkCorrupt(
                        f"file {p.entry.path!r}: a lent blob's chunk {i} changed while it "
                        "was copied"
                    )
                pwrite_all(p.fd, buf, at)
                continue
            copy_range(src, p.fd, c.size, at)

    def _place_files(self, files: list[mf.FileEntry], seen: dict[bytes, Ready]) -> None:
        plan = _plan(
            files, self.mode, self.link_ok, lambda d: seen[d].mtime, lambda d: seen[d].mode
        )
        self.mtime_copies += plan.mtime_copies
        self.mode_copies += plan.mode_copies

        def blob_path(d: bytes) -> str:
            return seen[d].path

        links = _Links()
        if plan.links:
            if self.lend is not None:
                self.lend(sorted({f.digest for f in plan.links}))
            try:
                _link_all(
                    plan.links,
                    links,
                    self.fs,
                    blob_path,
                    self.dev,
                    self.dirfds,
                    self.mode,
                    self.cancel,
                    self.done,
                    announce=self.fs.linking if self.progressive and not self.keep else None,
                )
            finally:  # what was linked before a failure is taken back too
                self.linked += [(f.path, f.digest) for f in links.made]
            self.links.n += links.n
            self.links.digests |= links.digests
            self.links.limit_copies += links.limit_copies
        copies = plan.copies + links.copies
        self.copied += len(copies)
        self._sender.send(copies, blob_path)

    def _moved(self, files: list[mf.FileEntry]) -> None:
        """A lent blob moved while it was copied: the copies not handed over go, whatever
        `keep` says (a build directory goes whole)."""
        self.fs.unplace([f.path for f in files])


def _dirs(m: mf.Manifest) -> list[str]:
    """Every directory of the tree, parents before children."""
    out: set[str] = set()
    parents = {*(f.path.rpartition("/")[0] for f in m.files)}
    parents.update(s.path.rpartition("/")[0] for s in m.symlinks)
    for d in [*parents, *m.dirs]:
        while d and d not in out:  # a directory already seen brought its parents along
            out.add(d)
            d = d.rpartition("/")[0]
    return sorted(out, key=lambda d: (d.count("/"), d))


@dataclass
class _Plan:
    """What each file of the tree will be, before anything is built."""

    links: list[mf.FileEntry]  # to link, where the caller's view allows
    copies: list[mf.FileEntry]
    empties: list[mf.FileEntry]
    mtime_copies: int = 0
    mode_copies: int = 0


def may_link(f: mf.FileEntry, mode: str, link_ok: bool, shows: int = BLOB_MODE) -> bool:
    """Whether `f` would be linked to a blob of mode `shows`, its mtime aside: `mode` and
    `link_ok` allow it, and the blob's mode shows f's read and exec bits (0444 for a 0644
    file, 0555 for a 0755 one: a link is read-only). A blob of any other mode (a write bit,
    setuid: a chmod behind hostd) shows no file's."""
    return mode != "copy" and link_ok and (f.mode & EXEC_BLOB_MODE) == shows


def _plan(
    files: Sequence[mf.FileEntry],
    mode: str,
    link_ok: bool,
    blob_mtime: Callable[[bytes], int | None],
    blob_mode: Callable[[bytes], int],
) -> _Plan:
    empties = [f for f in files if not f.size]
    if mode == "copy" or not link_ok:
        return _Plan([], [f for f in files if f.size], empties)
    plan = _Plan([], [], empties)
    for f in files:
        if not f.size:
            continue
        if not may_link(f, mode, link_ok, blob_mode(f.digest)):
            plan.mode_copies += 1
            plan.copies.append(f)
        elif f.mtime is not None and blob_mtime(f.digest) != f.mtime:
            plan.mtime_copies += 1
            plan.copies.append(f)
        else:
            plan.links.append(f)
    return plan


def _build(
    m: mf.Manifest,
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    mode: str,
    link_ok: bool,
    cancel: threading.Event,
    on_files: Callable[[list[mf.FileEntry]], object] | None,
    watch: Watch,
    blob_mtime: Callable[[bytes], int | None],
    blob_mode: Callable[[bytes], int],
) -> Outcome:
    """Links are made here while the helper creates the copies known beforehand (a thread
    of this one sends them), but those of a blob that is also linked: a link moves the
    blob's ctime, which the check of a watched blob's copy would take for a write (a read
    back). They, and the copies a link failure adds, go after."""
    plan = _plan(m.files, mode, link_ok, blob_mtime, blob_mode)
    dev, dirfds = fs.begin(_dirs(m), sorted({f.path.rpartition("/")[0] for f in plan.links}))
    links = _Links()
    done = _Done(on_files)
    if not plan.links:
        _send_files(plan.copies, plan.empties, fs, blob_path, cancel.is_set, done, watch)
    else:
        linking = {f.digest for f in plan.links}
        early = [f for f in plan.copies if f.digest not in linking]
        late = [f for f in plan.copies if f.digest in linking]
        halt = threading.Event()  # a link failed: the copies stop too

        def stop() -> bool:
            return cancel.is_set() or halt.is_set()

        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hostd-copy") as pool:
            job = pool.submit(_send_files, early, plan.empties, fs, blob_path, stop, done, watch)
            try:
                _link_all(plan.links, links, fs, blob_path, dev, dirfds, mode, cancel, done)
            except BaseException:
                halt.set()  # the pool's exit waits for the copies to stop
                raise
            finally:
                close_fds(list(dirfds.values()))
            job.result()
        _send_files(late + links.copies, [], fs, blob_path, cancel.is_set, done, watch)
    if m.symlinks:
        fs.symlinks((s.path, s.target) for s in m.symlinks)
    return Outcome(
        links.n,
        len(plan.copies) + len(links.copies),
        len(plan.empties),
        frozenset(links.digests),
        mtime_copies=plan.mtime_copies,
        mode_copies=plan.mode_copies,
        limit_copies=links.limit_copies,
    )


@dataclass
class _Links:
    """What linking did: files linked (and their blobs), copies it left to make."""

    n: int = 0
    digests: set[bytes] = field(default_factory=set)
    copies: list[mf.FileEntry] = field(default_factory=list)
    limit_copies: int = 0
    made: list[mf.FileEntry] = field(default_factory=list)  # each file linked


def _link_all(
    files: list[mf.FileEntry],
    out: _Links,
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    dev: int,
    dirfds: dict[str, int],
    mode: str,
    cancel: threading.Event,
    done: _Done,
    announce: Callable[[list[tuple[str, int]]], None] | None = None,
) -> None:
    """Link `files` into the helper's directories `dirfds`, on filesystem `dev`; what cannot
    be linked goes to `out.copies` (in `link` mode: fails). `announce`, where given, hears
    of each batch, (path, the blob's inode) each, before it is linked."""
    views = _Views(fs)
    try:
        owned = _caller_dirs(dirfds, fs.caller.uid)
        # Per directory, not per file (a restore of 10,000 files spent 40 ms here): where
        # each caller's directory links into (-1: not one to link into), and each blob
        # directory's view in the caller's namespace (-1: none on `dev`).
        into = {d: fd if owned[d] else -1 for d, fd in dirfds.items()}
        seen: dict[str, int] = {}
        jobs: list[LinkJob] = []
        linking: list[mf.FileEntry] = []
        for f in files:
            path = blob_path(f.digest)  # <blobs_dir>/<xx>/<hex>
            cut = path.rfind("/", 0, path.rfind("/"))
            view = seen.get(blobs_dir := path[:cut])
            if view is None:
                fd, view_dev = views.of(blobs_dir)
                view = seen[blobs_dir] = fd if fd >= 0 and view_dev == dev else -1
            d, _, leaf = f.path.rpartition("/")
            to = into[d]
            if view < 0 or to < 0:
                if mode == "link":  # links or fails: never a quiet copy of the tree
                    raise _cannot_link(f, "the caller cannot see the blob's tier there")
                out.copies.append(f)
                continue
            jobs.append((view, path[cut + 1 :], to, leaf))
            linking.append(f)
        # Each link: a blob, named below a blob directory checked above (nothing below it
        # is the caller's: it is hostd's, 0700), into a directory the helper made; no
        # symlink is followed.
        for i in range(0, len(jobs), LINK_BATCH):
            if cancel.is_set():
                raise Cancelled()
            linked: list[mf.FileEntry] = []
            if announce is not None:
                batch = linking[i : i + LINK_BATCH]
                announce([(f.path, os.stat(blob_path(f.digest)).st_ino) for f in batch])
            errs = link_files(jobs[i : i + LINK_BATCH])
            failed: HostdError | OSError | None = None
            for f, err in zip(linking[i : i + LINK_BATCH], errs, strict=True):
                if err == 0:
                    linked.append(f)
                elif failed is not None:
                    continue
                elif mode == "link" and err in (errno.EXDEV, errno.EPERM):
                    failed = _cannot_link(f, os.strerror(err))
                elif err in _COPY_INSTEAD:
                    out.limit_copies += err == errno.EMLINK
                    out.copies.append(f)
                elif err == errno.EEXIST:  # (a progressive restore's target is the caller's)
                    failed = UsageError(f"{f.path!r} appeared in the target")
                else:
                    failed = OSError(err, os.strerror(err), f.path)
            out.n += len(linked)  # (what was linked is told, and taken back, as any)
            out.digests.update(f.digest for f in linked)
            out.made += linked
            done.add(linked)
            if failed is not None:
                raise failed
    finally:
        views.close()


class _Done:
    """`on_files` for each batch of files made, called from the threads that make them under
    one lock (the caller's counters are plain `+=`)."""

    def __init__(self, on_files: Callable[[list[mf.FileEntry]], object] | None) -> None:
        self.on_files = on_files
        self.lock = threading.Lock()

    def add(self, files: list[mf.FileEntry]) -> None:
        if self.on_files is not None and files:
            with self.lock:
                self.on_files(files)


def _cannot_link(f: mf.FileEntry, why: str) -> UsageError:
    return UsageError(
        f"field 'mode': cannot link {f.path!r} into the target ({why}); "
        "use --mode auto to copy what cannot be linked"
    )


def _caller_dirs(dirfds: dict[str, int], uid: int) -> dict[str, bool]:
    """Whether each directory descriptor from the helper really is a directory the caller
    owns: a helper that lied could otherwise have the daemon link blobs anywhere. One the
    daemon may not even stat (a FUSE mount of the caller's without allow_other) is not one
    to link into: its files are copied, by the helper."""
    try:
        got = fstat_fds(list(dirfds.values()))
    except PermissionError:
        return {d: _owned_dir(fd, uid) for d, fd in dirfds.items()}
    return {d: stat.S_ISDIR(st[0]) and st[1] == uid for d, st in zip(dirfds, got, strict=True)}


def _owned_dir(fd: int, uid: int) -> bool:
    try:
        st = os.fstat(fd)
    except PermissionError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


def _send_files(
    copies: list[mf.FileEntry],
    empties: list[mf.FileEntry],
    fs: AsUser,
    blob_path: Callable[[bytes], str],
    stop: Callable[[], bool],
    done: _Done,
    watch: Watch,
) -> None:
    """The helper creates the empty files, and the copies in batches (_Sender), largest
    first, so one big file does not finish last alone."""
    copies.sort(key=_SIZE, reverse=True)  # stable: equal sizes keep the tree's order
    with _Sender(fs, stop, done, watch) as sender:
        if empties:
            sender.empties(empties)
        sender.send(copies, blob_path)
        sender.drain()


def _empty_items(files: list[mf.FileEntry]) -> list[tuple[str, int, int, str, int | None]]:
    """The helper's items that create `files`, all empty."""
    return [(f.path, f.mode, 0, "empty", f.mtime) for f in files]


class _Sender:
    """Copies on their way to the helper, in batches, each with the blobs' descriptors: it
    writes them as the caller. Each batch is sent while the helper still creates the one
    before (`AsUser.call` pipelines the calls of AHEAD + 1 threads), so it finds the next on
    its socket when done; meanwhile this thread opens the one after. That holds across calls
    of `send` (a placer's batches) until `drain`, which waits for every answer. `stop()` is
    asked before each batch.

    A blob linked out may be written through a link while it is copied: a watched one's
    (`Watch`: lent when its batch was opened, or by the time the helper answered, or any
    under leases) state is compared with the state it was verified in, and before and after.
    One linked while copied moves even if no one wrote it (the link itself moves its ctime):
    a copy that saw its blob move is read back and hashed, and handed over only if whole
    (else BlobMoved: the restore builds its tree again, and the blob is re-hashed first).
    `on_moved`, where given, hears of every copy not handed over then (that batch's, and
    those of the batches still out, once answered), before BlobMoved is raised."""

    def __init__(
        self,
        fs: AsUser,
        stop: Callable[[], bool],
        done: _Done,
        watch: Watch,
        on_moved: Callable[[list[mf.FileEntry]], None] | None = None,
    ) -> None:
        self.fs, self.stop, self.done, self.watch = fs, stop, done, watch
        self.on_moved = on_moved
        self.sent: collections.deque[_Sent] = collections.deque()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            AHEAD + 1, thread_name_prefix="hostd-copy"
        )

    def __enter__(self) -> _Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def empties(self, files: list[mf.FileEntry]) -> None:
        opened = _Opened(files, [], [], [], [], [])
        self.sent.append(_Sent(opened, self.pool.submit(self.fs.files, _empty_items(files), [])))

    def send(self, copies: list[mf.FileEntry], blob_path: Callable[[bytes], str]) -> None:
        """Send `copies` in batches, in this order; returns with AHEAD batches at most
        still out."""
        for batch in _batches(copies):
            if self.stop():
                raise Cancelled()
            opened = _open_batch(batch, blob_path, self.watch)
            items = [(f.path, f.mode, f.size, "copy", f.mtime) for f in batch]
            try:
                job = self.pool.submit(self.fs.files, items, opened.fds)
            except BaseException:
                opened.close()
                raise
            self.sent.append(_Sent(opened, job, self.watch, self.fs))
            while len(self.sent) > AHEAD:
                self._finish()

    def drain(self) -> None:
        """Wait for every batch out; each one's files are `done` as it is answered."""
        while self.sent:
            self._finish()

    def told(self) -> None:
        """Finish the batches already answered, in order, without waiting: their files are
        told even while the batches that follow them are all links (nothing sent)."""
        while self.sent and self.sent[0].job.done():
            self._finish()

    def settle(self, *, tell: bool) -> None:
        """After a failure elsewhere, before the helper takes back: wait for each batch
        still out. With `tell` (a progressive restore's: what landed may be kept), each is
        finished as `drain` would (checked, its files told, a failed one's landed files
        told), one whose watched blob moved handed to `on_moved`, nothing raised: a file left
        in the target is one that was told. Without, quietly (a hidden build goes whole)."""
        if not tell:
            self._settle()
            return
        while self.sent:
            x = self.sent.popleft()
            try:
                x.finish(self.done)
            except ChunkCorrupt:
                if self.on_moved is not None:
                    with contextlib.suppress(Exception):
                        self.on_moved(x.opened.batch)
            except Exception:  # (the failure being handled is the one raised)
                pass

    def _finish(self) -> None:
        s = self.sent.popleft()
        try:
            s.finish(self.done)
        except ChunkCorrupt:
            if self.on_moved is not None:
                out = list(self.sent)
                self._settle()
                self.on_moved([f for x in (s, *out) for f in x.opened.batch])
            raise

    def _settle(self) -> None:
        """Wait for the answers of the batches still out, quietly, and close their
        descriptors (after a failure)."""
        sent, self.sent = list(self.sent), collections.deque()
        concurrent.futures.wait([x.job for x in sent])
        for x in sent:
            x.opened.close()

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self.pool.shutdown()


def _batches(copies: list[mf.FileEntry]) -> Iterator[list[mf.FileEntry]]:
    """BATCH_FILES at most (FIRST_FILES the first), and BATCH_BYTES unless it is one file."""
    i = 0
    most = FIRST_FILES
    while i < len(copies):
        batch: list[mf.FileEntry] = []
        size = 0
        while i < len(copies) and len(batch) < most and (not batch or size < BATCH_BYTES):
            batch.append(copies[i])
            size += copies[i].size
            i += 1
        yield batch
        most = BATCH_FILES


@dataclass
class _Opened:
    """A batch of copies with its blobs opened, each blob's stat as opened, whether it was
    watched then, and the state its record was verified in then (watched ones)."""

    batch: list[mf.FileEntry]
    fds: list[int]
    before: list[FdStat]
    watched: list[bool]
    verified: list[State | None]
    held: list[int | None]

    def close(self) -> None:
        fds, self.fds = self.fds, []
        close_fds(fds)


def _open_batch(
    batch: list[mf.FileEntry], blob_path: Callable[[bytes], str], watch: Watch
) -> _Opened:
    """The batch's blobs opened, with their stats (one each, in C): a blob lent while the
    helper copies it is checked against the state it had before, as one lent already."""
    fds = open_paths([blob_path(f.digest) for f in batch])
    try:
        watched, verified, held = watch.opened([f.digest for f in batch])
        return _Opened(batch, fds, fstat_fds(fds), watched, verified, held)
    except BaseException:
        close_fds(fds)
        raise


@dataclass
class _Sent:
    """A batch the helper is creating."""

    opened: _Opened
    job: concurrent.futures.Future[None]
    watch: Watch = field(default_factory=lambda: Watch())
    fs: AsUser | None = None  # (to re-read a copy whose blob moved)

    def finish(self, done: _Done) -> None:
        """Wait for the helper's answer, check the watched blobs (then or now) did not move
        since they were verified, or else that their copies hash right (a link another
        restore made moves the blob's ctime as a write does). Files of a failed batch that
        landed are told all the same (progressive, kept)."""
        o = self.opened
        try:
            try:
                self.job.result()
            except HostdError as e:
                landed = set(getattr(e, "landed", ()))
                done.add([f for f in o.batch if f.path in landed])
                raise
            w = self.watch
            if w.every:  # (every one watched: the batch as it is)
                after = fstat_fds(o.fds)
                moved = [o.batch[j] for j in w.moved(o.batch, o.before, o.verified, o.held, after)]
            else:
                check = [i for i, was in enumerate(o.watched) if was or w.lent(o.batch[i].digest)]
                after = fstat_fds([o.fds[i] for i in check]) if check else []
                moved = [
                    o.batch[check[j]]
                    for j in w.moved(
                        [o.batch[i] for i in check],
                        [o.before[i] for i in check],
                        [o.verified[i] for i in check],
                        [o.held[i] for i in check],
                        after,
                    )
                ]
            if moved:
                bad, why = _badly_copied(self.fs, moved)
                if bad is not None:
                    raise BlobMoved(bad.digest, bad.path, why)
                log.info(
                    "%d copies whose blob moved while they were made (a link, or a write "
                    "that missed them) were read back: they hash right",
                    len(moved),
                )
        finally:
            o.close()
        done.add(o.batch)


def _badly_copied(fs: AsUser | None, files: list[mf.FileEntry]) -> tuple[mf.FileEntry | None, str]:
    """Of copies whose blob moved while they were made, the first whose bytes (read back
    through the helper, as the caller) do not hash to the file's chunks, or that could not
    be read back (and why: a mode that denies its owner reading, say); None if every one
    hashes right."""
    if fs is None:
        return files[0], "no helper to read it"
    try:
        fds = fs.reopen([f.path for f in files])
    except (HostdError, OSError) as e:
        why = e.message if isinstance(e, HostdError) else os_cause(e)
        log.warning("could not read back copies to check them: %s", why)
        return files[0], why
    try:
        for f, fd in zip(files, fds, strict=True):
            if os.fstat(fd).st_size != f.size:
                return f, ""
            # (every chunk but the last is the chunk size: the first's, where there are two)
            if f.size and digest_of(fd, f.size, f.chunks[0].size) != f.digest:
                return f, ""
    except (OSError, EOFError) as e:
        return files[0], os_cause(e) if isinstance(e, OSError) else str(e)
    finally:
        close_fds(fds)
    return None, ""


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

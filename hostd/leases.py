"""Read leases on blobs linked out: any open of one for writing, through any name, is heard.

A link restore hands a caller the cache's own inode. That caller cannot write it, but a root
process that reaches its tree can (a root container on a volume it shares), and put the
mtime back; a link or an unlink (a client's `rm` of its tree) moves the ctime as a write
does, so the ctime alone cannot tell them apart without a re-hash after every `rm`. With
`[access] link_checks = "lease"` (the default) the daemon holds a read lease (fcntl
F_SETLEASE, F_RDLCK) on each blob before it links it to a caller that cannot write it. The
kernel breaks the lease on any open of the inode for writing, and on a truncate(2), through
whatever name, before the opener gets its descriptor (it waits until the lease is given up),
and tells the daemon with a signal; links and unlinks do not break it. So while a blob's
lease holds, no one has written it since the lease was taken, whatever its ctime says. (An
open for reading with O_TRUNC breaks none, and empties the file: every use's size check sees
it.) A lease cannot be taken while anything holds the inode open for writing, a writable
shared mapping included (its stores move no time until written back): a re-hash takes the
lease first (Cache._hash), and a blob it cannot take one on counts as bad.

`Cache` asks `holds` in its check of a blob's state: a blob with no lease that holds is
checked by ctime too (`blobs.state_holds`), which any write moves, and is re-hashed before
its next use where it moved. A broken lease is given up at once (the opener goes on) and
forgotten, so the next check re-hashes. Leases are per process: after a restart none holds,
and a blob linked out before it is re-hashed at its next use where its ctime moved since
the clean stop recorded it (Cache.record_leased), or since its last verification after a
crash.

A lease is taken before its blob is checked (its state against the record, `Cache.lease`;
its bytes, `Cache._hash`), and vouches for nothing until that check passed (`vouch`): a
write just before the take moved a ctime that the lease would otherwise vouch for. Each
lease is numbered, so that a copy can tell the lease it saw as its batch was opened from
one taken since (materialize.Watch); each break is recorded before the lease is given up,
so before its writer can write (`broken_since`). Unless the kernel gives it up itself, when
the daemon has not within /proc/sys/fs/lease-break-time (45 s): then no break is counted,
and the lease is seen gone only by asking it (`holds`, `holding`, `holds_on`), and the
write by the ctime it moved.

The signal names no descriptor that Python can read, so a break makes `scan` ask each lease
(F_GETLEASE: a lease being broken reports the type it is to become, F_UNLCK): one system
call a lease, on a thread, only when a signal came.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Iterable, Sequence

from hostd.fastcopy import (
    F_GETLEASE,
    F_SETLEASE,
    F_SETSIG,
    FdStat,
    fdstat_of,
    lease_types,
    take_leases,
)

SIGNAL = signal.SIGRTMIN + 3  # (Python uses none of the real-time signals)
# Leases held at most: a descriptor each (the daemon gives a Leases no more than its
# descriptor limit leaves for them: daemon.lease_budget). Past it a blob is linked with none
# (ctime-checked).
MOST = 100_000
# Breaks remembered by blob (`broken_since`): a restore that began before the oldest
# forgotten one takes every blob it asks about as broken.
BREAKS_KEPT = 65_536
# What a failed take means: the filesystem takes no leases, the process may not take one
# on that file (not its owner, no CAP_LEASE), or it has no descriptor to spare (the blob
# goes without one), versus someone holds it open for writing now (EAGAIN: do not link it).
NOT_HERE = (
    errno.EINVAL,
    errno.ENOLCK,
    errno.ENOSYS,
    errno.EMFILE,
    errno.ENFILE,
    errno.EACCES,
    errno.EPERM,
)


Key = tuple[bytes, str]  # a blob's (digest, tier name)
# What `take` answers for one (key, path), or the exception it raises (take_many).
Took = tuple[FdStat | None, int] | None | Exception


class Busy(Exception):
    """The blob is open for writing somewhere right now: no read lease can be taken."""


class Leases:
    """The read leases this daemon holds, by blob: (digest, tier name)."""

    def __init__(self, most: int = MOST) -> None:
        self.most = most
        self._fds: dict[Key, int] = {}
        # Each lease's number (`holds_on`: the same lease at two moments), and those not
        # vouched for yet: a lease is taken before its blob is checked (its state against
        # the record, Cache.lease; its bytes, Cache._hash), and vouches for nothing until
        # the check passed (`vouch`): a write before the take moved a ctime that a lease
        # taken then would otherwise vouch for.
        self._ids: dict[Key, int] = {}
        self._at: dict[Key, tuple[int, int, int]] = {}  # (size, mtime_ns, ctime_ns) at the take
        self._taken = 0
        self._unvouched: set[Key] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Leases broken since start (a writer opened the blob); each break's number, by
        # digest, recorded before its lease is given up (the writer waiting on it goes on
        # only after): the BREAKS_KEPT latest, `_floor` the newest forgotten.
        self.broken = 0
        self._breaks: dict[bytes, int] = {}
        self._floor = 0

    def __repr__(self) -> str:
        return f"Leases({len(self._fds)} held, {self.broken} broken)"

    def __len__(self) -> int:
        return len(self._fds)

    def take(self, key: Key, path: str) -> tuple[FdStat | None, int] | None:
        """Hold a read lease on the file at `path` for `key` (blocking): the stat of the
        inode a new one is held on (fastcopy.FdStat: the caller checks it, the inode it
        verified, in the state it verified? then `vouch`es for it) and its number; (None, 0)
        for one held already, not broken and vouched for, which is kept (one not vouched
        for yet is kept too, and answered as a new one); None where this filesystem or
        process can hold no more, or the leases are closed (the blob goes without one).
        Busy if the file is open for writing now."""
        with self._lock:
            if self._closed:
                return None
            return self._take(key, path)

    def take_many(self, items: Sequence[tuple[Key, str]]) -> list[Took]:
        """`take` of each (key, path), under one hold of the lock, those with no lease yet
        in one native call (fastcopy.take_leases): what `take` answers for each, or the
        exception it raises (Busy, OSError), in order."""
        out: list[Took] = [None] * len(items)
        with self._lock:
            if self._closed:
                return out
            fresh: list[int] = []
            again: list[int] = []  # a key asked twice: taken (or kept) after the batch
            asked: set[Key] = set()
            for i, (key, path) in enumerate(items):
                if key in asked:
                    again.append(i)
                elif key in self._fds:
                    out[i] = self._took(key, path)
                else:
                    asked.add(key)
                    fresh.append(i)
            # Past `most`, taken one by one after the batch, as `take` would (None where no
            # room is left: a batch member that fails takes none).
            room = max(0, self.most - len(self._fds))
            again[:0] = fresh[room:]
            fresh = fresh[:room]
            got = take_leases([items[i][1] for i in fresh], SIGNAL)
            for i, (first, second) in zip(fresh, got, strict=True):
                key, path = items[i]
                if isinstance(second, tuple):
                    out[i] = second, self._held(key, first, second)
                elif second == 2 and first == errno.EAGAIN:
                    out[i] = Busy(f"{path} is open for writing")
                elif first not in NOT_HERE:
                    out[i] = OSError(first, os.strerror(first), path)
            for i in sorted(again):
                out[i] = self._took(*items[i])
        return out

    def _took(self, key: Key, path: str) -> Took:
        try:
            return self._take(key, path)
        except (Busy, OSError) as e:
            return e

    def _take(self, key: Key, path: str) -> tuple[FdStat | None, int] | None:
        """`take`'s body (the lock held, not closed)."""
        fd = self._fds.get(key)
        if fd is not None and _holding(fd):
            if key in self._unvouched:
                return fdstat_of(os.fstat(fd)), self._ids[key]
            return None, 0
        if fd is not None:
            self._broke(key)  # (before its writer may go on)
            self._forget(key)
        if len(self._fds) >= self.most:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in NOT_HERE:
                return None
            raise
        try:
            fcntl.fcntl(fd, F_SETSIG, SIGNAL)
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EAGAIN:
                raise Busy(f"{path} is open for writing") from None
            if e.errno in NOT_HERE:
                return None
            raise
        st = fdstat_of(os.fstat(fd))
        return st, self._held(key, fd, st)

    def _held(self, key: Key, fd: int, st: FdStat) -> int:
        """Keep a new lease, on `fd` (the lock held), unvouched: its number."""
        self._fds[key] = fd
        self._taken += 1
        self._ids[key] = self._taken
        self._unvouched.add(key)
        self._at[key] = st[4], st[5], st[6]
        return self._taken

    def vouch(self, key: Key, number: int) -> None:
        """The blob lease `number` (`take`'s) was taken on was checked since (its state, its
        bytes): from now on that lease vouches that no one wrote it, while it holds. (One
        broken meanwhile, and another taken in its place, vouches for nothing.)"""
        with self._lock:
            if self._ids.get(key) == number:
                self._unvouched.discard(key)

    def holds(self, key: Key) -> bool:
        """Whether a lease taken for `key` and vouched for still holds: none broke it since
        it was taken. (Under the lock: a descriptor `scan` closes meanwhile could be reused
        by `take`.)"""
        with self._lock:
            fd = self._fds.get(key)
            return fd is not None and key not in self._unvouched and _holding(fd)

    def numbers(self, keys: Sequence[Key]) -> list[int | None]:
        """The number of the lease taken for each key, if one is (held or not, vouched for
        or not: `holds_on` says)."""
        ids = self._ids
        return [ids.get(key) for key in keys]

    def holding(self, keys: Sequence[Key]) -> list[bool]:
        """`holds` of each key, under one hold of the lock and in one native call."""
        with self._lock:
            fds = [-1 if k in self._unvouched else self._fds.get(k, -1) for k in keys]
            types = iter(lease_types([fd for fd in fds if fd >= 0]))
            return [fd >= 0 and next(types) == fcntl.F_RDLCK for fd in fds]

    def holds_on(self, key: Key, dev: int, ino: int) -> tuple[int, tuple[int, int, int]] | None:
        """The number of the lease taken for `key` and vouched for, where it still holds on
        the inode (`dev`, `ino`), and that inode's (size, mtime_ns, ctime_ns) at its take:
        none broke it since it was taken, so no one opened that inode for writing since.
        The same number at two moments: the same lease held throughout (one taken in
        between vouches for nothing before its take). None: no such lease."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is None or key in self._unvouched or not _holding(fd):
                return None
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino):
                return None
            return self._ids[key], self._at[key]

    def broken_since(self, count: int, digests: Iterable[bytes]) -> set[bytes]:
        """Of `digests`, those whose lease broke since `broken` was `count`: someone opened
        them for writing since. All of them where breaks since then were forgotten."""
        with self._lock:
            if count == self.broken:
                return set()  # (none since: the usual answer, at no cost a digest)
            if count < self._floor:
                return set(digests)
            breaks = self._breaks
            return {d for d in digests if breaks.get(d, -1) > count}

    def release(self, key: Key) -> None:
        """Give up `key`'s lease, if any (its blob is dropped or replaced); one being
        broken counts as broken."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                if not _holding(fd):
                    self._broke(key)
                self._forget(key)

    def scan(self) -> list[Key]:
        """Give up every lease being broken (the openers waiting on them go on), and
        forget them; their keys (blocking)."""
        with self._lock:
            broken = [key for key, fd in self._fds.items() if not _holding(fd)]
            for key in broken:
                self._broke(key)  # (before its writer may go on)
                self._forget(key)
        return broken

    def held(self) -> list[tuple[Key, os.stat_result]]:
        """Each lease vouched for that still holds, with its inode's stat now (blocking): no
        one has opened it for writing since the lease was taken."""
        with self._lock:
            return [
                (key, os.fstat(fd))
                for key, fd in self._fds.items()
                if key not in self._unvouched and _holding(fd)
            ]

    def close(self) -> None:
        """Give every lease up; none is taken from now on (a thread of a cancelled restore
        may still ask: once the event loop is gone, a break's signal would end the
        process)."""
        with self._lock:
            self._closed = True
            for key in list(self._fds):
                self._forget(key)

    def _broke(self, key: Key) -> None:
        """Record a break of `key`'s lease (the lock held), before it is given up."""
        self.broken += 1
        digest = key[0]
        self._breaks.pop(digest, None)  # (the newest last)
        self._breaks[digest] = self.broken
        while len(self._breaks) > BREAKS_KEPT:
            self._floor = self._breaks.pop(next(iter(self._breaks)))

    def _forget(self, key: Key) -> None:
        fd = self._fds.pop(key)
        del self._ids[key], self._at[key]
        self._unvouched.discard(key)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)


def _holding(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False

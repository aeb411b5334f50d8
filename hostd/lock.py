"""One daemon per cache: exclusive locks on the cache's directories, and their private mode.

A daemon takes `flock(LOCK_EX | LOCK_NB)` on a `.lock` file in each tier directory and in
the index's directory before it touches anything there (no tmp/ sweep, no index open, no
socket claimed). flock locks the inode, not the path, so the lock holds against every
spelling of a directory: a symlink, a bind mount, a config that differs only in `socket`.
The kernel drops the lock with the last descriptor, so a daemon killed with SIGKILL leaves
a lock file that the next one simply takes; the files are never removed (unlinking a lock
file races with a daemon that has just opened it).

The holder writes its pid and socket into the file once locked, so a second daemon can say
whom it lost to. This module decides nothing else: it does no cache I/O.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from hostd.errors import HostdError, os_cause

LOCK_NAME = ".lock"
PRIVATE_MODE = 0o700


class CacheLocked(HostdError):
    """Another process holds the lock of a tier or of the index: this daemon must not start."""


def private_dir(path: Path) -> None:
    """Make `path` a directory only its owner can enter (0700), creating it if needed.

    Existing directories are chmodded too: versions before 0700 made them 0755. A shared
    directory (sticky bit, like /tmp or /dev/shm) is refused rather than closed to everyone.
    """
    mode = _own_dir(path)
    if stat.S_IMODE(mode) != PRIVATE_MODE:
        os.chmod(path, PRIVATE_MODE)


def _own_dir(path: Path) -> int:
    """mkdir -p `path` (the last one 0700); its mode, or HostdError if it is a shared one."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_MODE)
    st = os.stat(path)
    mode = st.st_mode
    if st.st_uid != os.geteuid():
        # Its owner could rename, replace or rewrite whatever hostd keeps in it (a blob of
        # the same size and mtime is used unchecked), and chmod it open again.
        raise HostdError(
            f"{path} is owned by uid {st.st_uid}, not by hostd's (uid {os.geteuid()}): "
            f"its owner could change the cache behind hostd's back; chown it to uid "
            f"{os.geteuid()} or use another directory"
        )
    if mode & stat.S_ISVTX:
        # A fresh tmpfs mount is 1777 too, and looks just like an empty /dev/shm: say how.
        raise HostdError(
            f"{path} is a shared directory (sticky bit, like /tmp or /dev/shm), and hostd "
            f"will not close it to everyone (0700): use a directory of hostd's own in it, "
            f"or mount a filesystem meant for hostd alone with mode=0700"
        )
    return mode


class CacheLocks:
    """The locks one daemon holds, one per directory; released by `release()` or at exit."""

    def __init__(self) -> None:
        self._held: list[tuple[str, Path, int]] = []  # (what, directory, fd)

    def __repr__(self) -> str:
        return f"CacheLocks({', '.join(f'{what}={d}' for what, d, _ in self._held)})"

    @classmethod
    def take(cls, places: Sequence[tuple[str, Path]], socket: Path) -> CacheLocks:
        """Lock each (what, directory) in order, or release the ones taken and raise
        CacheLocked naming the holder. Creates a missing directory (0700) and its lock file,
        nothing else: blocking, run it in a thread."""
        locks = cls()
        try:
            for what, directory in places:
                locks._take(what, directory, socket)
        except BaseException:
            locks.release()
            raise
        return locks

    def _take(self, what: str, directory: Path, socket: Path) -> None:
        path = directory / LOCK_NAME
        try:
            _own_dir(directory)  # made 0700 if new; an old 0755 one is chmodded once locked
        except HostdError as e:
            raise HostdError(f"{what}: {e.message}") from None
        except OSError as e:
            raise _failed(what, directory, f"creating {directory}", e) from e
        # The lock is held on a read-only descriptor: one left open for writing would make
        # the filesystem "busy" to a read-only remount, which must fail this daemon's writes
        # (a tier error), not the remount. O_CREAT still creates a missing file.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _failed(what, directory, f"opening {path}", e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _failed(what, directory, f"locking {path}", e) from e
            raise CacheLocked(self._refusal(what, directory, path, holder)) from None
        # Written only once locked, so what a loser reads is the holder's (or, in the instant
        # between the holder's flock and this write, a dead predecessor's: harmless).
        try:
            _write_holder(path, socket)
        except OSError as e:
            os.close(fd)
            raise _failed(what, directory, f"writing {path}", e) from e
        self._held.append((what, directory, fd))

    def _refusal(self, what: str, directory: Path, path: Path, holder: dict[str, object]) -> str:
        pid, sock = holder.get("pid", "unknown"), holder.get("socket", "unknown")
        if pid == os.getpid():  # two places of this one config are the same directory
            same = next(
                (w for w, d, _ in self._held if os.path.samefile(d, directory)), "another one"
            )
            return f"{what} ({directory}) is the same directory as {same}; give each its own"
        return (
            f"{what} ({directory}) is locked by another hostd (pid {pid}, socket {sock}); "
            f"one daemon per cache: stop that one or give this one other tiers and index "
            f"(lock file {path})"
        )

    def release(self) -> None:
        for _, _, fd in self._held:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the flock; the file stays (see the module doc)
        self._held.clear()


def _failed(what: str, directory: Path, doing: str, e: OSError) -> HostdError:
    """The error of a lock that could not be taken for want of a writable directory: the
    same words as a tier's own write errors ("not writable", "full")."""
    return HostdError(f"{what} ({directory}): {doing} failed: {os_cause(e)} ({e.strerror or e})")


def _write_holder(path: Path, socket: Path) -> None:
    """Write this daemon's pid and socket into the lock file through a descriptor of its
    own, closed at once. flock belongs to the lock's open file description, so closing this
    other one leaves the lock held (unlike a POSIX fcntl lock, which any close drops)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "socket": str(socket)}).encode(), 0)
    finally:
        os.close(fd)


def _holder(fd: int) -> dict[str, object]:
    try:
        doc = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}

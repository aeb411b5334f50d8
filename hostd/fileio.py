"""Blocking file I/O shared by the daemon and its helper process (stdlib only): a copy loop,
a sendfile of a file range to a socket, and the syscalls Python lacks (openat2, renameat2).

The helper (fsops.py) starts once per operation, so this module must stay light: no imports
beyond the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import threading
from collections.abc import Iterator

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def copy_range(fd_in: int, fd_out: int, size: int, at: int | None = None) -> None:
    """Copy `size` bytes from the start of `fd_in` to `fd_out`: copy_file_range (which clones
    where the filesystem can), else sendfile for pairs it cannot do (another filesystem type).
    `at`: the bytes at that offset of `fd_in`, to the same offset of `fd_out`."""
    left = size
    base = at or 0
    try:
        while left > 0:
            step = min(left, 1 << 30)
            if at is None:
                n = os.copy_file_range(fd_in, fd_out, step)
            else:
                n = os.copy_file_range(fd_in, fd_out, step, base + size - left, base + size - left)
            if n == 0:
                break
            left -= n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while left > 0:
        if at is not None:
            os.lseek(fd_out, base + size - left, os.SEEK_SET)
        n = os.sendfile(fd_out, fd_in, base + size - left, min(left, 1 << 30))
        if n == 0:
            raise OSError(errno.EIO, f"source shrank while copying ({left} bytes short)")
        left -= n


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@contextlib.contextmanager
def writing_as(uid: int) -> Iterator[None]:
    """This thread's filesystem uid is `uid` meanwhile (setfsuid: per thread). Writes by
    the daemon into a caller's file, through a descriptor the caller's helper opened,
    then count as the caller's where a filesystem asks who writes: ext4's blocks reserved
    for root (resuid) are not the caller's to fill. A uid of -1 leaves it as it is."""
    if uid < 0:
        yield
        return
    before = libc.setfsuid(uid)
    try:
        yield
    finally:
        libc.setfsuid(before)


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    raw = os.fsencode(path)
    for _ in range(16):  # EAGAIN: a rename raced the lookup; the kernel asks us to try again
        fd = libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(raw),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100


def link_fd(fd: int, path: str) -> None:
    """linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH): give the open file `fd` (an unnamed
    O_TMPFILE one) the name `path`. os.link has no AT_EMPTY_PATH; kernels that ask for
    CAP_DAC_READ_SEARCH for it refuse it with ENOENT (or EPERM) without."""
    rc = libc.linkat(
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_int(AT_EMPTY_PATH),
    )
    _check(rc, path)


def renameat2(dirfd: int, old: str, new: str, flags: int, new_dirfd: int | None = None) -> None:
    """Rename `old` to `new`, both under `dirfd` (`new` under `new_dirfd` where given)."""
    rc = libc.renameat2(
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(old)),
        ctypes.c_int(dirfd if new_dirfd is None else new_dirfd),
        ctypes.c_char_p(os.fsencode(new)),
        ctypes.c_uint(flags),
    )
    _check(rc, new)


def _check(rc: int, path: str) -> None:
    """A libc call's result: OSError with its errno, naming `path`, where it failed."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def send_range(
    sock_fd: int, file_fd: int, offset: int, count: int, stall: float, stop: threading.Event
) -> None:
    """Send `count` bytes of `file_fd` from `offset` to a non-blocking socket by sendfile: the
    kernel copies, no byte passes through Python. Waits for room in the socket's buffer in
    short slices, so `stop` (the request was cancelled) is seen within 0.2 s; TimeoutError if
    the receiver takes nothing for `stall` seconds; EOFError if the file is shorter."""
    end = offset + count
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    waited = 0.0
    while offset < end:
        if stop.is_set():
            raise InterruptedError("the request was cancelled")
        try:
            n = os.sendfile(sock_fd, file_fd, offset, min(end - offset, 1 << 30))
        except BlockingIOError:
            n = -1
        if n == 0:
            raise EOFError(f"the file ends {end - offset} bytes short of the range")
        if n > 0:
            offset += n
            waited = 0.0
            continue
        events = poller.poll(200)
        if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in events):
            raise BrokenPipeError(errno.EPIPE, "the receiver closed the connection")
        if not events:
            waited += 0.2
        if waited >= stall:
            raise TimeoutError(f"the receiver took nothing for {stall:g} s")


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>
_sync_file_range = getattr(libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing these bytes of `fd` back to its disk now, without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)): the sync that makes them durable later finds
    them written, rather than a whole blob's dirty pages. It guarantees nothing itself; a
    no-op on tmpfs, and where the C library lacks the call."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Make everything written to the filesystem holding `path` durable: one syncfs(2) for a
    batch of files instead of an fsync each (Python has no os.syncfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check(libc.syncfs(fd), str(path))
    finally:
        os.close(fd)

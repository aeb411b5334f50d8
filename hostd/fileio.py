"""Blocking file I/O shared by the daemon and its helper process (stdlib only): a copy loop,
and the syscalls Python lacks (openat2, renameat2).

The helper (fsops.py) starts once per operation, so this module must stay light: no imports
beyond the standard library.
"""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RENAME_EXCHANGE = 2


def copy_range(fd_in: int, fd_out: int, size: int) -> None:
    """Copy `size` bytes from the start of `fd_in` to `fd_out`: copy_file_range (which clones
    where the filesystem can), else sendfile for pairs it cannot do (another filesystem type)."""
    left = size
    try:
        while left > 0:
            n = os.copy_file_range(fd_in, fd_out, min(left, 1 << 30))
            if n == 0:
                break
            left -= n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while left > 0:
        n = os.sendfile(fd_out, fd_in, size - left, min(left, 1 << 30))
        if n == 0:
            raise OSError(errno.EIO, f"source shrank while copying ({left} bytes short)")
        left -= n


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


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


def renameat2(dirfd: int, old: str, new: str, flags: int) -> None:
    rc = libc.renameat2(
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(old)),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(new)),
        ctypes.c_uint(flags),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)

"""Small blocking file-I/O loops shared by the daemon and its helper process (stdlib only).

The helper (fsops.py) starts once per operation, so this module must stay light: no imports
beyond the standard library.
"""

from __future__ import annotations

import errno
import os


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

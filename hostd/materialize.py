"""The one place that turns a manifest and complete blobs into a directory tree.

The tree is built in a hidden sibling of the target and renamed into place, so a target
either does not exist, or is the previous tree, or is the complete new tree. Files are
hardlinked to their read-only blob (`link`: O(files)), copied with copy_file_range (`copy`),
or linked where the target shares the blob's filesystem (`auto`). A file is copied rather
than linked when linking would show the wrong mode (only read-only files match a blob's
0444), or when the blob is at the link limit (EMLINK); an empty file is created.

Runs in a worker thread (blocking I/O). A `threading.Event` lets the async caller stop it
between files; it then removes what it built and never renames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hostd.core import manifest as mf
from hostd.errors import TargetExists, UsageError
from hostd.tier import BLOB_MODE, copy_range

MODES = ("link", "copy", "auto")
COPY_THREADS = 4
_RENAME_EXCHANGE = 2


class Cancelled(Exception):
    """The caller gave up; what was built is removed."""


@dataclass(frozen=True, slots=True)
class Outcome:
    linked: int
    copied: int
    created: int


def check_target(target: Path, replace: bool) -> None:
    """Refuse a target we must not touch, before any bytes are fetched for it."""
    if not target.is_absolute():
        raise UsageError(f"target {str(target)!r} is not an absolute path")
    if not target.parent.is_dir():
        raise UsageError(f"target's parent directory {str(target.parent)!r} does not exist")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise TargetExists(f"target {str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not replace:
        raise TargetExists(f"target {str(target)!r} exists and is not empty (use replace)")


def materialize(
    m: mf.Manifest,
    target: Path,
    blob_path: Callable[[bytes], Path],
    *,
    mode: str,
    replace: bool,
    cancel: threading.Event,
    owner: tuple[int, int] | None = None,
    on_file: Callable[[int], None] | None = None,
) -> Outcome:
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    check_target(target, replace)
    build = target.parent / f".{target.name}.hostd-{secrets.token_hex(6)}"
    os.mkdir(build, 0o755)
    try:
        out = _build(m, build, blob_path, mode, cancel, owner, on_file)
        if cancel.is_set():
            raise Cancelled()
        _swap_in(build, target, replace)
        return out
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _build(
    m: mf.Manifest,
    root: Path,
    blob_path: Callable[[bytes], Path],
    mode: str,
    cancel: threading.Event,
    owner: tuple[int, int] | None,
    on_file: Callable[[int], None] | None,
) -> Outcome:
    dirs = {
        str(Path(p).parent) for p in [*(f.path for f in m.files), *(s.path for s in m.symlinks)]
    }
    dirs.update(m.dirs)
    for d in sorted(dirs - {"."}):
        (root / d).mkdir(parents=True, exist_ok=True)
    root_dev = os.stat(root).st_dev
    linked = created = 0
    copies: list[tuple[Path, Path, int, int]] = []
    for f in m.files:
        if cancel.is_set():
            raise Cancelled()
        dest = root / f.path
        if f.size == 0:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, f.mode)
            os.close(fd)
            os.chmod(dest, f.mode)
            created += 1
        else:
            src = blob_path(f.digest)
            if not (_should_link(mode, f.mode, src, root_dev) and _link(src, dest)):
                copies.append((src, dest, f.mode, f.size))
                continue
            linked += 1
        if on_file is not None:
            on_file(f.size)
    _copy_all(copies, cancel, on_file)
    for s in m.symlinks:
        os.symlink(s.target, root / s.path)
    if owner is not None:
        _chown_tree(root, owner)
    return Outcome(linked, len(copies), created)


def _copy_all(
    copies: list[tuple[Path, Path, int, int]],
    cancel: threading.Event,
    on_file: Callable[[int], None] | None,
) -> None:
    """Copy files on a few threads: one copy stream leaves a disk's queue and a second core
    idle. Largest first, so one big file does not finish last alone."""
    lock = threading.Lock()

    def one(job: tuple[Path, Path, int, int]) -> None:
        if cancel.is_set():
            raise Cancelled()
        src, dest, mode, size = job
        _copy(src, dest, mode)
        if on_file is not None:
            with lock:
                on_file(size)

    copies.sort(key=lambda j: -j[3])
    if len(copies) <= 1:
        for job in copies:
            one(job)
        return
    with ThreadPoolExecutor(max_workers=min(COPY_THREADS, len(copies))) as pool:
        futures = [pool.submit(one, job) for job in copies]
        try:
            for fut in futures:
                fut.result()
        except BaseException:
            cancel.set()  # the rest stop before starting
            raise


def _should_link(mode: str, file_mode: int, src: Path, root_dev: int) -> bool:
    if mode == "copy" or (file_mode & 0o555) != BLOB_MODE:
        return False
    return mode == "link" or os.stat(src).st_dev == root_dev


def _link(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest)
    except OSError as e:
        if e.errno in (errno.EMLINK, errno.EXDEV, errno.EPERM):
            return False  # link limit, other filesystem, or protected_hardlinks: copy instead
        raise
    return True


def _copy(src: Path, dest: Path, mode: int) -> None:
    with open(src, "rb") as fi:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            copy_range(fi.fileno(), fd, os.fstat(fi.fileno()).st_size)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _chown_tree(root: Path, owner: tuple[int, int]) -> None:
    """Give the caller what the daemon made for it (copies, dirs, symlinks); links to blobs stay
    the daemon's, read-only."""
    uid, gid = owner
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_nlink == 1 or os.path.isdir(p) or os.path.islink(p):
                os.lchown(p, uid, gid)


def _swap_in(build: Path, target: Path, replace: bool) -> None:
    try:
        os.rename(build, target)  # target absent, or an empty directory
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not replace:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise TargetExists(f"target {str(target)!r} appeared while restoring") from e
            raise
    if _exchange(build, target):
        shutil.rmtree(build, ignore_errors=True)  # `build` now holds the old tree
        return
    old = target.parent / f".{target.name}.hostd-old-{secrets.token_hex(6)}"
    os.rename(target, old)
    os.rename(build, target)
    shutil.rmtree(old, ignore_errors=True)


_libc: ctypes.CDLL | None = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))

"""The helper process: filesystem work for one socket client, with its rights, by descriptor.

The daemon runs as root beside untrusted clients, so it never touches a caller's files with
its own rights. For each operation that does (a publish reads the source, a restore builds
the target and may remove the tree it replaces) a helper process is forked from the zygote
(`python -m hostd.fsops FD`, started once by the daemon), and the helper:

1. reads one `init` message naming the caller (uid, gid, groups, pid, and a pidfd of it);
2. drops to exactly those credentials (setgroups, setresgid, setresuid: they are per
   process, so a thread could not do this) before it looks at any path, which also makes it
   non-dumpable, so the caller cannot ptrace it and borrow the descriptors the daemon sends;
3. opens the caller's root, `/proc/<pid>/root`, and resolves every path it is given under it
   with openat2(RESOLVE_IN_ROOT): paths are the caller's own, in its mount namespace (a
   container's `/models` is its own), never the host's;
4. works below the directory it resolved only relative to directory descriptors, with
   O_NOFOLLOW/RESOLVE_NO_SYMLINKS, checking what it opened with fstat, never resolving a path
   again after checking it: a caller racing renames and symlinks can redirect nothing.
   A FIFO, socket or device is never opened (O_PATH, fstat, then reopen regular files only).

The daemon sends requests and reads answers over one Unix stream socket: frames of a 4-byte
length and a JSON object, descriptors attached with SCM_RIGHTS. Blob descriptors come in to
be copied from; source files and build directories go out. If the daemon goes away (EOF),
the helper removes the tree it was building and exits, so a killed daemon leaves no debris.

Standard library only: it starts once per operation, so it imports little.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import os
import resource
import signal
import socket
import stat
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hostd.core.pathfilter import PathFilter
from hostd.fastcopy import Job, create_files
from hostd.fileio import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RESOLVE_BENEATH,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    libc,
    openat2,
    renameat2,
)
from hostd.frames import recv_frame, send_frame

BUILD_INFIX = ".hostd-"
NAME_MAX = 255  # bytes of one name (Linux)
# The mark on a build directory the helper made (an extended attribute, as the caller, who
# owns it): the sweep removes only those. Its name alone proves nothing: in a directory two
# users may write, one can rename the other's tree to a build's name.
BUILD_MARK = "user.hostd.build"
PART_PREFIX = ".hostd-part-"  # a progressive restore's file before it is whole
# The tree a restore builds, inside its build directory: made there with the mode, group and
# default ACL a directory made beside the target gets (inherited through the build, which
# is the caller's alone: 0700), renamed out onto the target at the commit.
BUILD_TREE = "tree"
_PR_SET_DUMPABLE = 4


class Refused(Exception):
    """What the helper answers with: a kind the daemon maps to its errors, and a message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _taken(name: str) -> Refused:
    """A name this restore was about to make (O_EXCL), made by someone else meanwhile: in a
    progressive restore's target, one of its scratch names."""
    return Refused("changed", f"{name!r} appeared in the tree being built")


# ---------------------------------------------------------------------------------------------
# The helper.


class Helper:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.root = -1  # the caller's root directory, O_PATH
        self.caller_caps = 0  # the caller's effective capabilities, as a bit mask
        # publish
        self.src = -1
        self.src_path = ""
        # restore
        self.parent = -1
        self.parent_path = ""
        self.name = ""
        self.build = ""
        self.build_fd = -1
        self.dirs: dict[str, int] = {}
        self.target_id: list[int] | None = None
        self.committed = False
        # a progressive restore builds in the target itself, each file landing whole
        self.progressive = False
        self.keep = False  # progressive: what was placed stays when the restore fails
        self.made_target = False  # progressive: the target is ours (else it was empty)
        self.made_dirs: list[str] = []  # progressive: the tree's directories it made
        # progressive: (path, inode, ctime) of what it landed; the ctime too, as ext4 gives
        # a file the caller makes under a name it removed the inode number freed
        self.placed: list[tuple[str, int, int]] = []
        # progressive: (path, inode) of each link the daemon said it was about to make, so
        # that an abort of our own (the daemon died) takes them back too
        self.linking: list[tuple[str, int]] = []
        self.parts = 0  # progressive: the next scratch name's number
        # progressive: files written a range at a time by the daemon (op_parts), by path:
        # (their directory's descriptor, scratch name, our descriptor of the file)
        self.open_parts: dict[str, tuple[int, str, int]] = {}

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon went away mid-request (killed): clean up below, quietly
        finally:
            self.abort()

    def _serve(self) -> None:
        while True:
            got = recv_frame(self.sock)
            if got is None:
                return  # the daemon went away (or is done): clean up below
            msg, fds = got
            try:
                reply, out = self._answer(msg, fds)
            finally:
                # before the answer: the daemon closes its own copies of the blobs after
                # it, so the last close of each, which frees the file, is not ours
                _close_all(fds)
            try:
                send_frame(self.sock, reply, out)
            finally:
                _close_all(out)
            if msg.get("op") == "close":
                return

    def _answer(self, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Run one request: its answer, an error one where it was refused or failed. An
        error answer still says what the request placed before it failed (a progressive
        batch half landed, the directories made before one failed): the daemon's ledger
        must know it, should this helper die."""
        before, made_before = len(self.placed), len(self.made_dirs)
        failed: dict[str, Any]
        try:
            op = getattr(self, "op_" + str(msg.get("op")), None)
            if op is None:
                raise Refused("protocol", f"unknown operation {msg.get('op')!r}")
            reply: tuple[dict[str, Any], list[int]] = op(msg, fds)
            return reply
        except Refused as e:
            failed = {"error": e.kind, "message": e.message}
        except OSError as e:
            failed = {"error": "os", "message": _oserror(e), "errno": e.errno}
        if len(self.placed) > before:
            failed["placed"] = self.placed[before:]
        if len(self.made_dirs) > made_before:
            failed["made_dirs"] = self.made_dirs[made_before:]
        return failed, []

    def op_close(self, _msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        return {"ok": True}, []

    # -- who we act as ---------------------------------------------------------------------
    def op_init(self, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Take the caller's root, then its credentials. The root is opened first, while we
        may still be root: the kernel's ptrace check on /proc/<pid>/root refuses an opener
        without the caller's capabilities (a container's root), which the caller's bare uid
        lacks. Every lookup under it is made after the drop, with the caller's rights."""
        uid, gid, pid = int(msg["uid"]), int(msg["gid"]), int(msg["pid"])
        groups = [int(g) for g in msg["groups"]]
        if msg.get("root"):
            # The root an earlier helper of this caller opened: the caller may be gone. Its
            # capabilities cannot be read any more, so a root caller's helper keeps none.
            self.root = os.dup(fds[0])
            pid = max(pid, 1)
        if pid <= 0:
            raise Refused(
                "forbidden",
                "the calling process is not visible to hostd (another pid namespace): its "
                "paths cannot be resolved in its own mount namespace",
            )
        pidfd = fds[0] if fds and not msg.get("root") else -1
        root_error = None if self.root >= 0 else self._open_root(pid, pidfd)
        # Not dumpable before the drop (the kernel clears it on a uid change only where
        # fs.suid_dumpable is 0): the caller must never ptrace us or read our descriptors.
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        if os.geteuid() == 0:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        elif os.geteuid() != uid:
            raise Refused(
                "forbidden",
                f"hostd runs as uid {os.geteuid()} and cannot act with uid {uid}'s rights",
            )
        if os.getresuid() != (uid, uid, uid):
            raise Refused("forbidden", f"could not take uid {uid}'s rights")
        if uid == 0:
            # Root keeps its capabilities through the drop: keep only those the caller had
            # (a container's root may have dropped some), never more than it.
            _limit_caps(self.caller_caps)
        os.umask(0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # a tree of many directories keeps one descriptor each
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if self.root < 0 and self._open_root(pid, pidfd) is not None:
            raise Refused(
                "forbidden",
                f"cannot resolve paths in the caller's mount namespace: /proc/{pid}/root is "
                f"closed to hostd ({root_error}) and to uid {uid} (the process holds "
                f"capabilities uid {uid} lacks, or is not dumpable)",
            )
        return {"ok": True}, [os.dup(self.root)]

    def _open_root(self, pid: int, pidfd: int) -> str | None:
        """Open /proc/<pid>/root as self.root; None, or why it could not be opened."""
        try:
            proc = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Refused("gone", "the calling process went away") from None
        try:
            try:
                root = os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
            except PermissionError as e:
                return e.strerror
            try:
                self.caller_caps = _effective_caps(proc)
            except OSError:
                self.caller_caps = 0
            if pidfd >= 0:  # the pidfd pins the process we mean: /proc/<pid> must still be it
                try:
                    signal.pidfd_send_signal(pidfd, 0)
                except ProcessLookupError:
                    os.close(root)
                    raise Refused("gone", "the calling process went away") from None
            self.root = root
            return None
        finally:
            os.close(proc)

    def _resolve(self, path: str, flags: int) -> int:
        """A caller's absolute path, resolved under its root with its rights."""
        if not path.startswith("/") or "\0" in path:
            raise Refused("usage", f"{path!r} is not an absolute path")
        return openat2(self.root, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)

    def _chain(self, fd: int) -> list[list[int]]:
        """(dev, ino) of a directory and each of its ancestors up to the caller's root: what the
        daemon compares with its own storage, whatever path spelling led here."""
        top = os.fstat(self.root)
        out: list[list[int]] = []
        cur = os.dup(fd)
        try:
            for _ in range(4096):
                st = os.fstat(cur)
                if out and out[-1] == [st.st_dev, st.st_ino]:
                    break
                out.append([st.st_dev, st.st_ino])
                if (st.st_dev, st.st_ino) == (top.st_dev, top.st_ino):
                    break
                up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = up
        finally:
            os.close(cur)
        return out

    # -- publish: read the source ----------------------------------------------------------
    def op_source(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Resolve the directory to publish; where it is, for the daemon to check first."""
        path = str(msg["path"])
        try:
            self.src = self._resolve(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise Refused("usage", f"publish path {path!r} does not exist") from None
        except NotADirectoryError:
            raise Refused("usage", f"publish path {path!r} is not a directory") from None
        except PermissionError as e:
            raise _denied(e, f"publish path {path!r}") from None
        self.src_path = path
        return {"chain": self._chain(self.src)}, []

    def op_scan(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Walk the source by descriptor: files, symlinks (and where they lead), empty dirs.
        `include`/`exclude` patterns (core/pathfilter.py) leave entries out, an excluded
        directory unread; a FIFO, socket or device is never opened: it is skipped, and
        named in `skipped`."""
        if self.src < 0:
            raise Refused("protocol", "scan before source")
        try:
            keep = PathFilter(list(msg.get("include") or []), list(msg.get("exclude") or []))
        except ValueError as e:
            raise Refused("usage", str(e)) from None
        path = self.src_path
        files = _FileColumns()
        links: list[dict[str, Any]] = []
        dirs: list[str] = []
        skipped: list[dict[str, str]] = []
        everything = keep.empty  # (no pattern to try on each entry)
        ids: dict[tuple[int, int], str] = {}
        st = os.fstat(self.src)
        ids[(st.st_dev, st.st_ino)] = ""
        stack: list[tuple[int, str]] = [(os.dup(self.src), "")]
        try:
            while stack:
                dfd, rel_dir = stack.pop()
                try:
                    entries = sorted(_listdir(dfd, rel_dir))
                    kept = 0
                    prefix = f"{rel_dir}/" if rel_dir else ""
                    for name in entries:
                        rel = prefix + name
                        try:
                            name.encode("utf-8")
                        except UnicodeEncodeError:
                            raise Refused(
                                "usage", f"file name {rel!r} is not valid UTF-8"
                            ) from None
                        try:
                            est = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        except FileNotFoundError:
                            raise Refused(
                                "changed", f"{rel!r} was removed while the tree was read"
                            ) from None
                        mode = est.st_mode
                        if not everything and (
                            keep.excludes(rel)
                            or (not stat.S_ISDIR(mode) and not keep.includes(rel))
                        ):
                            # left out; known, so a symlink to it stays a symlink
                            ids.setdefault((est.st_dev, est.st_ino), rel)
                            continue
                        kept += 1
                        if stat.S_ISREG(mode):
                            ids[(est.st_dev, est.st_ino)] = rel
                            files.add(rel, est)
                        elif stat.S_ISLNK(mode):
                            links.append({"path": rel, "target": os.readlink(name, dir_fd=dfd)})
                        elif stat.S_ISDIR(mode):
                            sub = _open_dir(dfd, name, rel)
                            sst = os.fstat(sub)
                            if (sst.st_dev, sst.st_ino) != (est.st_dev, est.st_ino):
                                os.close(sub)
                                raise Refused("changed", f"{rel!r} changed while it was read")
                            ids[(sst.st_dev, sst.st_ino)] = rel
                            stack.append((sub, rel))
                        else:  # stat'ed, never opened
                            skipped.append({"path": rel, "kind": _kind(est.st_mode)})
                            kept -= 1
                    if not kept and rel_dir and keep.includes(rel_dir):
                        dirs.append(rel_dir)
                finally:
                    os.close(dfd)
        finally:
            for dfd, _ in stack:
                os.close(dfd)
        for link in links:
            link["resolved"] = self._follow(path, link, ids)
        out = {
            "files": files.encoded(),
            "symlinks": links,
            "dirs": sorted(dirs),
            "skipped": skipped,
        }
        return out, []

    def _follow(
        self, root_path: str, link: dict[str, Any], ids: dict[tuple[int, int], str]
    ) -> dict[str, Any]:
        """Where a symlink of the source leads, followed in the caller's root with its rights."""
        rel_dir = link["path"].rpartition("/")[0]
        where = "/".join(p for p in (root_path.rstrip("/"), rel_dir) if p)
        target = link["target"]
        full = target if target.startswith("/") else f"{where}/{target}"
        try:
            fd = self._resolve(full, os.O_PATH)
        except FileNotFoundError:
            return {"kind": "missing"}
        except OSError as e:
            return {"kind": "error", "message": e.strerror or str(e)}
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        inside = ids.get((st.st_dev, st.st_ino))
        if inside is not None:
            return {"kind": "inside", "rel": inside}
        if stat.S_ISREG(st.st_mode):
            return {"kind": "file", **_file(link["path"], st, full)}
        return {"kind": "other", "type": _kind(st.st_mode)}

    def op_open(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Source files to read, each opened O_PATH, checked to be the regular file the scan
        saw, then reopened for reading, which checks the caller's read permission. A batch
        per request: a tree of small files costs one round trip per batch, not per file."""
        out: list[int] = []
        try:
            for rel, ident, via in msg["items"]:
                out.append(self._open_source(str(rel), list(ident), via))
        except BaseException:
            for fd in out:
                os.close(fd)
            raise
        return {"ok": True}, out

    def _open_source(self, rel: str, ident: list[int], via: str | None) -> int:
        try:
            if via is None:
                fd = openat2(self.src, rel, os.O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
            else:
                fd = self._resolve(str(via), os.O_PATH)
        except OSError as e:
            raise Refused("changed", f"{rel!r} changed while it was published: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or [st.st_dev, st.st_ino] != ident:
                raise Refused("changed", f"{rel!r} changed while it was being published")
            try:
                return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except PermissionError as e:
                raise _denied(e, f"cannot read {rel!r}") from None
        finally:
            os.close(fd)

    # -- restore: build the target ---------------------------------------------------------
    def op_target(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Resolve the target's parent, check the target, and sweep what an earlier restore
        into it left behind."""
        path, replace = str(msg["path"]), bool(msg["replace"])
        name = self._parent_of(path)
        target_id = None
        try:
            st = os.stat(name, dir_fd=self.parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except PermissionError as e:  # the parent may be opened, not searched (0700, not ours)
            raise _denied(e, f"cannot look for target {path!r} in its parent") from None
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise Refused("exists", f"target {path!r} exists and is not a directory")
            target_id = [st.st_dev, st.st_ino]
            self.target_id = target_id
            if not replace:
                fd = _open_dir(self.parent, name, path)
                try:
                    if names := _listdir(fd, path):
                        raise Refused(
                            "exists", f"target {path!r} exists and is not empty{_cut_off(names)}"
                        )
                finally:
                    os.close(fd)
        self._sweep()
        return {
            "dev": os.fstat(self.parent).st_dev,
            "chain": self._chain(self.parent),
            "target": target_id,
        }, []

    def _parent_of(self, path: str) -> str:
        """Resolve the parent of target `path` (self.parent, self.parent_path); its name."""
        parent, _, name = path.rstrip("/").rpartition("/")
        if not path.startswith("/") or name in ("", ".", ".."):
            raise Refused("usage", f"target {path!r} is not an absolute path to a directory")
        self.parent_path, self.name = parent or "/", name
        try:
            self.parent = self._resolve(self.parent_path, os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            raise Refused(
                "usage", f"target's parent directory {self.parent_path!r} does not exist"
            ) from None
        except NotADirectoryError:
            raise Refused("usage", self._not_a_dir(self.parent_path)) from None
        except PermissionError as e:
            raise _denied(e, f"target's parent directory {self.parent_path!r}") from None
        return name

    def op_reclaim(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Take back what a progressive restore placed in target `path` whose helper died:
        its ledger, as that helper answered it (`target_id`, `made_target`, `made_dirs`,
        `placed`), and the daemon's `linked`, removed as that helper's abort would have
        (only names that still hold the inode placed there). The target, held for this by the
        daemon as for a progressive restore, must be the one that restore filled. `keep`
        (keep_partial): only the scratch files of what never landed go."""
        path = str(msg["path"])
        self._parent_of(path)
        fd = _open_dir(self.parent, self.name, path)
        self.dirs[""] = fd
        st = os.fstat(fd)  # (the daemon holds the target for this take-back: AsUser.reclaim)
        if [st.st_dev, st.st_ino] != list(msg["target_id"]):
            raise Refused("changed", f"target {path!r} was replaced since it was filled")
        self.progressive, self.target_id = True, [st.st_dev, st.st_ino]
        self.made_target = bool(msg["made_target"])
        for d in map(str, msg["made_dirs"]):  # parents first: one gone takes its children's
            up, _, leaf = d.rpartition("/")
            if up in self.dirs and _in_tree(d):
                with contextlib.suppress(OSError, Refused):  # (replaced: left, with its own)
                    self.dirs[d] = _open_dir(self.dirs[up], leaf, d)
                    self.made_dirs.append(d)
        self._drop_scratch()
        if not msg.get("keep"):
            self.placed = [_placed(item) for item in msg["placed"] if _in_tree(str(item[0]))]
            self._unplace(msg.get("linked") or [])
        self._close_dirs()
        return {"ok": True}, []

    def _drop_scratch(self) -> None:
        """The scratch files (PART_PREFIX) of a batch the dead helper was writing, in the
        tree's directories: names hostd keeps for itself, in a target this restore held.
        (A file or symlink it had renamed in but not yet told of is in the ledger by its
        inode: _landing.)"""
        for d, fd in self.dirs.items():
            with contextlib.suppress(OSError, Refused):
                for name in _listdir(fd, d):
                    if name.startswith(PART_PREFIX):
                        with contextlib.suppress(OSError):
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                                os.unlink(name, dir_fd=fd)

    def _not_a_dir(self, parent: str) -> str:
        """Why `parent` is not a directory: it is a file, or a file stands above it."""
        try:
            fd = self._resolve(parent, os.O_PATH)
        except OSError:
            return f"target's parent {parent!r} does not exist: a path above it is a file"
        try:
            kind = "a file" if stat.S_ISREG(os.fstat(fd).st_mode) else "not a directory"
        finally:
            os.close(fd)
        return f"target's parent {parent!r} is {kind}"

    def _sweep(self) -> None:
        """Remove build directories of earlier restores into this target that nobody holds
        (the helper that made one holds a lock on it while it lives)."""
        prefix = _build_prefix(self.name)
        try:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.parent)
        except OSError:
            return  # a parent we may search but not list: nothing to sweep that we can see
        try:
            names = [n for n in os.listdir(fd) if n.startswith(prefix)]
        finally:
            os.close(fd)
        for n in names:
            try:
                d = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.parent)
            except OSError:
                continue
            try:
                if not _marked_build(d):
                    continue  # not a build of the caller's: a tree someone gave that name
                fcntl.flock(d, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # held while removing, and only what still sits under that name
                _remove_build(self.parent, n, d)
            except OSError:
                continue  # a restore in progress holds it, or it went meanwhile
            finally:
                os.close(d)

    def op_begin(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Make the hidden build directory beside the target and every directory of the tree;
        hand out descriptors of those the daemon links files into. Progressive: the target
        itself instead, at once, where each file then lands whole (op_files)."""
        if self.parent < 0:
            raise Refused("protocol", "begin before target")
        if msg.get("progressive"):
            return self._begin_in_place(msg)
        self.build = f"{_build_prefix(self.name)}{os.urandom(6).hex()}"
        where = f"{self.parent_path.rstrip('/')}/{self.name}"
        try:  # the caller's alone until it is whole (commit): no other user opens it to lock it
            os.mkdir(self.build, 0o700, dir_fd=self.parent)
        except PermissionError as e:
            self.build = ""
            raise _denied(e, f"cannot create {where!r} in its parent") from None
        self.build_fd = _open_dir(self.parent, self.build, self.build)
        try:  # a sweep by another restore leaves it alone
            fcntl.flock(self.build_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused("changed", f"the tree being built for {where!r} is locked") from None
        _mark_build(self.build_fd)  # (so a sweep after a crash knows it for one)
        here = os.stat(self.build, dir_fd=self.parent, follow_symlinks=False)
        if not _same(here, os.fstat(self.build_fd)):  # swept or swapped before we locked it
            raise Refused("changed", f"the tree being built for {where!r} was moved away")
        os.mkdir(BUILD_TREE, 0o755, dir_fd=self.build_fd)
        self.dirs[""] = _open_dir(self.build_fd, BUILD_TREE, where)
        self._make_dirs(msg["dirs"], [])
        out = [os.dup(self.dirs[d]) for d in msg.get("want", [])]
        return {"dev": os.fstat(self.dirs[""]).st_dev}, out

    def _make_dirs(self, dirs: list[str], made: list[str]) -> None:
        """Make the tree's directories `dirs` (sorted, parents first), each added to `made`
        as it is; a failure names the one in the target."""
        for d in dirs:
            up, _, leaf = d.rpartition("/")
            try:
                os.mkdir(leaf, 0o755, dir_fd=self.dirs[up])
            except OSError as e:
                e.filename = f"{self.parent_path.rstrip('/')}/{self.name}/{d}"
                raise
            made.append(d)  # (before its open, which may fail: out of descriptors, say)
            self.dirs[d] = _open_dir(self.dirs[up], leaf, d)

    def _begin_in_place(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The target directory, made now (or the empty one there, as op_target checked, if
        the caller may write in it), and the tree's directories in it (`dirs`: none where
        the daemon asks for them once it holds the target, op_dirs). The daemon refuses a
        second progressive restore into it (AsUser.begin): a lock on the target, which any
        user who may open it could take first, would not do."""
        where = f"{self.parent_path.rstrip('/')}/{self.name}"
        made = False
        try:
            os.mkdir(self.name, 0o755, dir_fd=self.parent)
            made = True
        except FileExistsError:
            pass  # the empty directory op_target saw: checked again below
        except PermissionError as e:
            raise _denied(e, f"cannot create {where!r} in its parent") from None
        fd = _open_dir(self.parent, self.name, where)
        try:
            st = os.fstat(fd)
            if not made and self.target_id is None:  # (not there when op_target looked)
                raise Refused(
                    "exists", f"target {where!r} appeared while restoring (another restore?)"
                )
            if not made and [st.st_dev, st.st_ino] != self.target_id:
                raise Refused("changed", f"target {where!r} was replaced while restoring")
            if not made and (names := _listdir(fd, where)):
                raise Refused("exists", f"target {where!r} is not empty{_cut_off(names)}")
            if not made and not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
                # (or it would hold the target from restores by those who may, placing nothing)
                if os.fstatvfs(fd).f_flag & os.ST_RDONLY:  # as a write there would say
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.name)
                raise Refused("forbidden", f"cannot write in target {where!r}: permission denied")
        except BaseException:
            os.close(fd)
            if made:
                with contextlib.suppress(OSError):
                    os.rmdir(self.name, dir_fd=self.parent)
            raise
        # From here on, an abort takes back what this restore placed, and only that.
        self.progressive, self.keep, self.made_target = True, bool(msg.get("keep")), made
        self.target_id = [st.st_dev, st.st_ino]
        self.dirs[""] = fd
        self.parts = int.from_bytes(os.urandom(4))  # scratch names no other restore guesses
        dirs, out = self.op_dirs(msg, [])
        out.append(os.dup(fd))  # the daemon's pin on the target (asuser.Ledger)
        # The daemon keeps what a reclaim needs, should this helper die (op_reclaim).
        return {"dev": st.st_dev, "target_id": self.target_id, "made_target": made, **dirs}, out

    def op_dirs(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """A progressive restore's directories, made in its target (`dirs`, parents first):
        those made, and descriptors of `want`."""
        if not self.progressive or "" not in self.dirs:
            raise Refused("protocol", "dirs before a progressive begin")
        before = len(self.made_dirs)
        self._make_dirs(msg["dirs"], self.made_dirs)
        out = [os.dup(self.dirs[d]) for d in msg.get("want", [])]
        return {"made_dirs": self.made_dirs[before:]}, out

    def op_files(self, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Create files: `copy` ones from the blob descriptors sent with the frame, in order.
        hostd.fastcopy makes the batch in C without the GIL where it was built (a small file
        costs Python 40-60 µs of CPU, C ~24, `cp -r` ~30), else in Python on a few threads."""
        jobs: list[Job] = []
        paths: list[str] = []
        dirs = self.dirs
        sources = iter(fds)
        for path, mode, size, kind, mtime in msg["items"]:
            up, _, leaf = path.rpartition("/")
            if self.progressive:  # written under a scratch name, renamed in once whole
                leaf = f"{PART_PREFIX}{self.parts}"
                self.parts += 1
            jobs.append(
                (dirs[up], leaf, mode, size, next(sources) if kind == "copy" else -1, mtime)
            )
            paths.append(path)
        try:
            create_files(jobs, paths)
        except BaseException as e:
            # O_EXCL: a name was taken meanwhile (in a progressive restore's target, the
            # scratch name of the file the error names): not ours to remove
            name = str(e.filename) if isinstance(e, FileExistsError) else None
            taken = paths.index(name) if name in paths else -1
            if self.progressive:
                self._drop_parts([job for i, job in enumerate(jobs) if i != taken])
            if name is not None:
                if self.progressive and taken >= 0:
                    up, leaf = name.rpartition("/")[0], jobs[taken][1]
                    name = f"{up}/{leaf}" if up else leaf
                raise _taken(name) from None
            raise
        if self.progressive:
            before = len(self.placed)
            self._land(jobs, paths)
            return {"ok": True, "placed": self.placed[before:]}, []
        return {"ok": True}, []

    def _land(self, jobs: list[Job], paths: list[str]) -> None:
        """Rename each complete file from its scratch name to its own, never over a name
        someone else made meanwhile: the target is the caller's, visible while it fills.
        The daemon hears each file's inode first (`landing`, a frame ahead of the answer):
        killed between a rename and the answer, we leave no file its ledger does not name."""
        try:
            self._landing(
                (path, os.stat(job[1], dir_fd=job[0], follow_symlinks=False).st_ino)
                for job, path in zip(jobs, paths, strict=True)
            )
        except BaseException:
            self._drop_parts(jobs)
            raise
        for i, (job, path) in enumerate(zip(jobs, paths, strict=True)):
            leaf = path.rpartition("/")[2]
            try:
                renameat2(job[0], job[1], leaf, RENAME_NOREPLACE)
                st = os.stat(leaf, dir_fd=job[0], follow_symlinks=False)
            except OSError as e:
                self._drop_parts(jobs[i:])
                if e.errno == errno.EEXIST:
                    raise Refused("changed", f"{path!r} appeared in the target") from None
                raise
            self.placed.append((path, st.st_ino, st.st_ctime_ns))

    def _landing(self, files: Iterable[tuple[str, int]]) -> None:
        """Tell the daemon the inode of each file of a batch about to be renamed in (path,
        inode), in a frame ahead of the batch's answer, so that its ledger names them all
        should we die between a rename and that answer. Not where what landed stays
        anyway (keep_partial)."""
        if not self.keep:
            send_frame(self.sock, {"landing": [[path, ino] for path, ino in files]})

    @staticmethod
    def _drop_parts(jobs: list[Job]) -> None:
        for job in jobs:
            with contextlib.suppress(OSError):
                os.unlink(job[1], dir_fd=job[0])

    def op_reopen(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Descriptors, open for reading, of files this tree made (`paths`, by its own
        directory descriptors, no symlink followed): the daemon re-reads copies whose blob
        moved while they were made, to hash them."""
        out: list[int] = []
        try:
            for path in map(str, msg["paths"]):
                up, _, leaf = path.rpartition("/")
                if up not in self.dirs or not leaf:
                    raise Refused("usage", f"{path!r}: not a file of this tree")
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                out.append(os.open(leaf, flags, dir_fd=self.dirs[up]))
        except BaseException:
            _close_all(out)
            raise
        return {"ok": True}, out

    def op_parts(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """A progressive restore's files that the daemon writes a verified range at a time
        (its `ranges`): each made empty under a scratch name, only the caller may read it,
        a descriptor open for writing handed to the daemon. Each lands whole (op_land)."""
        if not self.progressive:
            raise Refused("usage", "files written in ranges are for a progressive restore")
        names: list[str] = []
        out: list[int] = []
        try:
            for path in map(str, msg["paths"]):
                up, _, _ = path.rpartition("/")
                if path in self.open_parts or up not in self.dirs:
                    raise Refused("usage", f"{path!r}: not a file of this tree to write")
                leaf = f"{PART_PREFIX}{self.parts}"
                self.parts += 1
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    fd = os.open(leaf, flags, 0o600, dir_fd=self.dirs[up])
                except FileExistsError:
                    raise _taken(f"{up}/{leaf}" if up else leaf) from None
                self.open_parts[path] = (self.dirs[up], leaf, fd)
                names.append(f"{up}/{leaf}" if up else leaf)
                out.append(os.dup(fd))
        except BaseException:
            _close_all(out)
            raise
        return {"ok": True, "parts": names}, out

    def op_land(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Files op_parts made, now whole ([path, mode, mtime or None] each): their mode and
        mtime set, renamed in under their own names (never over one someone made)."""
        before = len(self.placed)
        self._landing(
            (str(path), os.fstat(self.open_parts[str(path)][2]).st_ino)
            for path, _, _ in msg["items"]
            if str(path) in self.open_parts
        )
        for path, mode, mtime in msg["items"]:
            path = str(path)
            got = self.open_parts.pop(path, None)
            if got is None:
                raise Refused("usage", f"{path!r}: no file of this tree is being written there")
            dfd, leaf, fd = got
            try:
                os.fchmod(fd, int(mode) & 0o7777)
                if mtime is not None:
                    os.utime(fd, ns=(int(mtime), int(mtime)))
                ino = os.fstat(fd).st_ino
                if os.stat(leaf, dir_fd=dfd, follow_symlinks=False).st_ino != ino:
                    raise Refused("changed", f"{path!r}: its scratch file was replaced")
                renameat2(dfd, leaf, path.rpartition("/")[2], RENAME_NOREPLACE)
                landed = os.fstat(fd)  # (a rename moves the ctime)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(leaf, dir_fd=dfd)
                if e.errno == errno.EEXIST:
                    raise Refused("changed", f"{path!r} appeared in the target") from None
                raise
            finally:
                _close(fd)
            self.placed.append((path, landed.st_ino, landed.st_ctime_ns))
        return {"ok": True, "placed": self.placed[before:]}, []

    def _drop_open_parts(self) -> None:
        """The files op_parts made that never landed: gone, whatever `keep` says (none is
        whole)."""
        for dfd, leaf, fd in self.open_parts.values():
            with contextlib.suppress(OSError):
                if os.stat(leaf, dir_fd=dfd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(leaf, dir_fd=dfd)
            _close(fd)
        self.open_parts.clear()

    def op_linking(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """The daemon is about to link these blobs, [path, inode] each, into a progressive
        restore's target: should it die before it can say abort, ours takes them back too
        (only names that then hold that inode)."""
        if self.progressive and not self.keep:
            self.linking += [(str(p), int(i)) for p, i in msg["items"] if _in_tree(str(p))]
        return {"ok": True}, []

    def op_sweep(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Remove the build directories beside target `path` that no restore holds: that of
        a helper that died while the daemon lives on."""
        self._parent_of(str(msg["path"]))
        self._sweep()
        return {"ok": True}, []

    def op_symlinks(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Make symlinks ([path, target] each). Progressive: each under a scratch name, then
        landed as files are (`_land`), so that the ledger names every one that landed."""
        if not self.progressive:
            for path, target in msg["items"]:
                up, _, leaf = str(path).rpartition("/")
                os.symlink(str(target), leaf, dir_fd=self.dirs[up])
            return {"ok": True, "placed": []}, []
        jobs: list[Job] = []
        paths: list[str] = []
        try:
            for path, target in msg["items"]:
                up = str(path).rpartition("/")[0]
                dfd = self.dirs[up]
                scratch = f"{PART_PREFIX}{self.parts}"
                self.parts += 1
                try:
                    os.symlink(str(target), scratch, dir_fd=dfd)
                except FileExistsError:
                    raise _taken(f"{up}/{scratch}" if up else scratch) from None
                jobs.append((dfd, scratch, 0, 0, -1, None))
                paths.append(str(path))
        except BaseException:
            self._drop_parts(jobs)
            raise
        before = len(self.placed)
        self._land(jobs, paths)
        return {"ok": True, "placed": self.placed[before:]}, []

    def op_unplace(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """A progressive restore's files to take back whatever `keep` says: a batch whose
        source moved while it was copied. Only names this helper placed, as it placed them."""
        gone = set(msg["paths"])
        self._remove([e for e in self.placed if e[0] in gone])
        self.placed = [e for e in self.placed if e[0] not in gone]
        return {"ok": True}, []

    def op_commit(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Rename the build into place. With replace, swap it with the old tree atomically
        (RENAME_EXCHANGE) and remove the old one with the caller's rights. Progressive: the
        tree is in place already."""
        target = f"{self.parent_path.rstrip('/')}/{self.name}"
        left = None
        if self.progressive:
            self.committed = True
            self._close_dirs()
            return {"ok": True, "old_tree_left": None}, []
        here = os.stat(self.build, dir_fd=self.parent, follow_symlinks=False)
        tree = os.stat(BUILD_TREE, dir_fd=self.build_fd, follow_symlinks=False)
        if not _same(here, os.fstat(self.build_fd)) or not _same(tree, os.fstat(self.dirs[""])):
            raise Refused("changed", f"the tree being built for {target!r} was moved away")
        try:  # what sits at the target now must be what was checked, or nothing
            now = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
            seen = [now.st_dev, now.st_ino]
        except FileNotFoundError:
            seen = None
        if seen is not None and self.target_id is None:
            raise Refused("exists", f"target {target!r} appeared while restoring")
        if seen is not None and seen != self.target_id:
            raise Refused("changed", f"target {target!r} was replaced while restoring")
        try:
            renameat2(self.build_fd, BUILD_TREE, self.name, 0, self.parent)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not msg.get("replace"):
                raise Refused("exists", f"target {target!r} appeared while restoring") from e
            try:
                renameat2(self.build_fd, BUILD_TREE, self.name, RENAME_EXCHANGE, self.parent)
            except PermissionError as e:  # (moving a directory out writes its `..`: the owner's)
                raise _denied(e, f"cannot replace {target!r} (moving it out)") from None
            self.committed = True
            self._close_tree()  # (the new tree is whole: its descriptors go before the old's)
            try:  # the old tree, now in the build directory, goes with the caller's rights
                _remove_tree(self.build_fd, BUILD_TREE)
            except OSError:
                # left in the build directory, marked: a later restore's sweep may take it
                left = f"{self.parent_path.rstrip('/')}/{self.build}/{BUILD_TREE}"
        self.committed = True
        if left is None:  # (empty: the tree went out of it)
            _remove_build(self.parent, self.build, self.build_fd)
        self._close_dirs()
        return {"ok": True, "old_tree_left": left}, []

    def op_abort(self, msg: dict[str, Any], _fds: list[int]) -> tuple[dict[str, Any], list[int]]:
        if msg.get("refused"):  # another restore holds the target: its to fill, not to remove
            self.made_target = False
        self.abort(msg.get("linked"))
        return {"ok": True}, []

    def abort(self, linked: list[list[Any]] | None = None) -> None:
        """Remove the build; for a progressive restore, what it placed (unless `keep`):
        `linked`, the daemon's links as [path, inode], and this helper's own files."""
        self._drop_open_parts()
        if self.progressive and not self.committed and self.dirs and not self.keep:
            self._unplace([*(linked or []), *map(list, self.linking)])
        if not self.progressive and self.build_fd >= 0 and not self.committed:
            self._close_tree()  # first: out of descriptors, the removal's would fail
            _remove_build(self.parent, self.build, self.build_fd)
        elif not self.progressive and self.build and not self.committed and self.parent >= 0:
            with contextlib.suppress(OSError):  # made, never opened: empty, or not ours
                os.rmdir(self.build, dir_fd=self.parent)
        self._close_dirs()
        self.build = ""

    def _unplace(self, linked: list[list[Any]]) -> None:
        """Take back exactly what this progressive restore placed: each file or symlink it
        landed (and each link the daemon made), where the name still holds that inode; then
        its directories, deepest first, where empty; then the target, if it made it and it
        is empty. Whatever else is there (the caller's own files) stays."""
        self._remove([*self.placed, *((str(p), int(i), -1) for p, i in linked)])
        self.placed = []
        for d in reversed(self.made_dirs):
            up, _, leaf = d.rpartition("/")
            with contextlib.suppress(OSError):
                os.rmdir(leaf, dir_fd=self.dirs[up])
        if self.made_target:
            with contextlib.suppress(OSError):  # not empty, or not ours any more: left
                st = os.stat(self.name, dir_fd=self.parent, follow_symlinks=False)
                if [st.st_dev, st.st_ino] == self.target_id:
                    os.rmdir(self.name, dir_fd=self.parent)

    def _remove(self, entries: list[tuple[str, int, int]]) -> None:
        """Unlink each (path, inode, ctime) where the name still holds that inode, with that
        ctime where one is given (-1: a link the daemon made to a blob, whose ctime moves
        with every link of it)."""
        for path, ino, ctime in entries:
            up, _, leaf = path.rpartition("/")
            dfd = self.dirs.get(up)
            if dfd is None:
                continue
            with contextlib.suppress(OSError):
                st = os.stat(leaf, dir_fd=dfd, follow_symlinks=False)
                if st.st_ino == ino and ctime in (-1, st.st_ctime_ns):
                    os.unlink(leaf, dir_fd=dfd)

    def _close_tree(self) -> None:
        """Close the descriptors of the tree's directories (not the build's)."""
        for fd in self.dirs.values():
            _close(fd)
        self.dirs.clear()

    def _close_dirs(self) -> None:
        self._close_tree()
        if self.build_fd >= 0:
            _close(self.build_fd)
        self.build_fd = -1


# The fields of each file a scan answers (FILE_COLUMNS): the paths as a JSON list, each number
# column as one base64 string of native 64-bit integers, typed as NUMBER_COLUMNS says. A JSON
# list of 10,000 numbers is encoded and decoded in a third of the time 10,000 objects take;
# the base64 of an array's bytes decodes into an array with no Python object per number (as
# JSON lists, 100,000 files' numbers were ~20 MB of ints in the daemon at its publish's peak).
FILE_COLUMNS = ("path", "mode", "size", "mtime", "ctime", "dev", "ino")
NUMBER_COLUMNS = {"mode": "Q", "size": "Q", "mtime": "q", "ctime": "q", "dev": "Q", "ino": "Q"}


class _FileColumns:
    """The regular files a scan found, as columns (FILE_COLUMNS)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.numbers = {k: array(code) for k, code in NUMBER_COLUMNS.items()}
        n = self.numbers
        self._cols = (n["mode"], n["size"], n["mtime"], n["ctime"], n["dev"], n["ino"])

    def __repr__(self) -> str:
        return f"_FileColumns({len(self.paths)} files)"

    def add(self, rel: str, st: os.stat_result) -> None:
        if not MIN_NS <= st.st_mtime_ns <= MAX_NS:
            raise Refused("usage", unrecordable_mtime(rel, st.st_mtime_ns))
        if not 0 <= st.st_size <= MAX_NS:
            raise Refused("usage", f"{rel!r}: its filesystem says its size is {st.st_size}")
        mode, size, mtime, ctime, dev, ino = self._cols
        self.paths.append(rel)
        mode.append(st.st_mode & 0o777)
        size.append(st.st_size)
        mtime.append(st.st_mtime_ns)
        # (only compared, never recorded: one past what a snapshot holds is clamped, and
        # the daemon's compare then reads the file again between two stats)
        ctime.append(min(max(st.st_ctime_ns, MIN_NS), MAX_NS))
        dev.append(st.st_dev)
        ino.append(st.st_ino)

    def encoded(self) -> dict[str, Any]:
        """The columns as the scan's answer carries them."""
        return {"path": self.paths, **{k: encode_numbers(a) for k, a in self.numbers.items()}}


# What a manifest records of an mtime (FORMAT.md section 4): a signed 64-bit count of ns.
MIN_NS, MAX_NS = -(1 << 63), (1 << 63) - 1


def unrecordable_mtime(path: str, ns: int) -> str:
    """Why a file whose mtime a snapshot cannot record is refused, naming it."""
    return (
        f"{path!r}: its mtime ({ns} ns from 1970) is outside what a snapshot records "
        "(a signed 64-bit count of nanoseconds: the years 1677 to 2262); set another "
        "with touch, or exclude it"
    )


def encode_numbers(column: array[int]) -> str:
    """A number column as a scan's answer carries it (NUMBER_COLUMNS)."""
    return base64.b64encode(column.tobytes()).decode("ascii")


def _file(rel: str, st: os.stat_result, via: str | None) -> dict[str, Any]:
    return {
        "path": rel,
        "mode": st.st_mode & 0o777,
        "size": st.st_size,
        "mtime": st.st_mtime_ns,
        "ctime": st.st_ctime_ns,
        "id": [st.st_dev, st.st_ino],
        "via": via,
    }


def _effective_caps(proc: int) -> int:
    """CapEff of the process whose /proc directory `proc` is."""
    fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        text = os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CAP_VERSION_3 = 0x20080522
_PR_SET_NO_NEW_PRIVS = 38


def _limit_caps(allowed: int) -> None:
    """Keep only the capabilities in `allowed` (effective and permitted), none inheritable,
    and no new privileges from exec."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise Refused("forbidden", "cannot read the helper's capabilities")
    for i in range(2):
        mask = (allowed >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted &= mask
        data[i].effective = data[i].permitted
        data[i].inheritable = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise Refused("forbidden", "cannot limit the helper to the caller's capabilities")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


CAP_SYS_RESOURCE = 24


def drop_capability(cap: int) -> bool:
    """Drop `cap` from this thread's effective and permitted sets (threads it starts later
    inherit that); whether it was held and is dropped now."""
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        return False
    word, bit = divmod(cap, 32)
    if not data[word].permitted & (1 << bit):
        return False
    data[word].permitted &= ~(1 << bit) & 0xFFFFFFFF
    data[word].effective &= ~(1 << bit) & 0xFFFFFFFF
    return bool(libc.capset(ctypes.byref(header), data) == 0)


def _placed(item: Any) -> tuple[str, int, int]:
    """A ledger's [path, inode, ctime] (or [path, inode]: any ctime)."""
    return (str(item[0]), int(item[1]), int(item[2]) if len(item) > 2 else -1)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _open_dir(dfd: int, name: str, what: str) -> int:
    try:
        return os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd
        )
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused("changed", f"{what!r} was replaced while hostd worked on it") from e
        if e.errno == errno.ENOENT:
            raise Refused("changed", f"{what!r} was removed while hostd worked on it") from e
        if e.errno == errno.EACCES:
            raise Refused("forbidden", f"cannot read {what!r}: permission denied") from e
        raise


def _listdir(dfd: int, what: str) -> list[str]:
    try:
        return os.listdir(dfd)
    except PermissionError as e:
        raise _denied(e, f"cannot read {what or '.'!r}") from None


def _cut_off(names: list[str]) -> str:
    """What a target's names say of how it came to hold them, where a progressive restore
    into it was cut off (its daemon and helper killed together): the scratch files of what
    had not landed are still there."""
    part = next((n for n in names if n.startswith(PART_PREFIX)), None)
    if part is None:
        return ""
    return f" (it holds {part!r}: a progressive restore into it was cut off before it was done)"


def _denied(e: PermissionError, what: str) -> Exception:
    """EACCES is the caller's own rights refusing `what`: forbidden (403, exit 5). EPERM is
    not always (an immutable or append-only file, a system call filter): it stays an OSError,
    answered as the filesystem refusing the request (asuser), `what` named."""
    if e.errno == errno.EACCES:
        return Refused("forbidden", f"{what}: permission denied")
    return OSError(e.errno, e.strerror, what)


def _oserror(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


def _build_prefix(name: str) -> str:
    """The start of the name of a build of target `name`: `.<name>.hostd-`, the target's
    name cut (at a character) so that the whole, 12 hex digits after it, fits NAME_MAX
    bytes: a target named up to the limit gets a build too."""
    room = NAME_MAX - 1 - len(BUILD_INFIX) - 12
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > room:
        name = raw[:room].decode("utf-8", "ignore")
    return f".{name}{BUILD_INFIX}"


def _remove_build(parent: int, name: str, fd: int) -> None:
    """Remove the build directory open at `fd`, named `name` in `parent`: what it holds,
    through `fd` (nothing outside it, whatever names say now), then the directory itself
    where `name` still is it. In a directory others may write, one may have moved the build
    away and given its name to another tree of the caller's: that tree stays."""
    with contextlib.suppress(OSError):
        _empty(fd)
    with contextlib.suppress(OSError):
        if _same(os.fstat(fd), os.stat(name, dir_fd=parent, follow_symlinks=False)):
            os.rmdir(name, dir_fd=parent)


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove directory `name` in `dir_fd` and everything in it (`_empty`); OSError where
    something could not go (what could, did)."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        _empty(fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


@dataclass
class _Level:
    """A directory being emptied by _empty: open at `fd`, named `name` in `parent`, with its
    subdirectories still to empty, and whether all it held went so far."""

    parent: int
    name: str
    fd: int
    subdirs: list[str]
    whole: bool = True


def _empty(top: int) -> None:
    """Remove everything in the directory open at `top`, through descriptors (no symlink
    followed, nothing outside it touched), a level at a time without recursing: a
    manifest's path may nest ~2,000 directories, past Python's recursion limit, where
    shutil.rmtree raised RecursionError (and the helper died, leaving the build for good).
    What can be removed is; the first error is raised after."""
    failed: OSError | None = None

    def scan(level: _Level) -> _Level:
        """Unlink what is not a directory; note the subdirectories."""
        nonlocal failed
        try:
            with os.scandir(level.fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        level.subdirs.append(entry.name)
                        continue
                    try:
                        os.unlink(entry.name, dir_fd=level.fd)
                    except OSError as e:
                        failed, level.whole = failed or e, False
        except OSError as e:
            failed, level.whole = failed or e, False
        return level

    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    stack = [scan(_Level(-1, "", top, []))]
    try:
        while len(stack) > 1 or stack[0].subdirs:
            level = stack[-1]
            if level.subdirs:
                sub = level.subdirs.pop()
                try:
                    stack.append(
                        scan(_Level(level.fd, sub, os.open(sub, flags, dir_fd=level.fd), []))
                    )
                except OSError as e:
                    failed, level.whole = failed or e, False
                continue
            stack.pop()
            os.close(level.fd)
            try:
                if level.whole:  # (else it holds what could not go: the error is kept)
                    os.rmdir(level.name, dir_fd=level.parent)
            except OSError as e:
                failed, level.whole = failed or e, False
            if not level.whole:
                stack[-1].whole = False
    finally:
        for level in stack[1:]:  # (the top one is the caller's)
            os.close(level.fd)
    if failed is not None:
        raise failed


def _mark_build(fd: int) -> None:
    """Mark a build directory the caller owns as one (BUILD_MARK). Where the filesystem
    keeps no user attributes, a build left by a crash stays until removed by hand."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, BUILD_MARK, b"1")


def _marked_build(fd: int) -> bool:
    """Whether the directory at `fd` is a build this caller made: its own, and marked."""
    if os.fstat(fd).st_uid != os.geteuid():
        return False
    try:
        return os.getxattr(fd, BUILD_MARK) == b"1"
    except OSError:
        return False


def _in_tree(path: str) -> bool:
    """A relative path that stays in the tree: no empty, '.' or '..' component."""
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_all(fds: list[int]) -> None:
    """Close each descriptor: a run of consecutive numbers, as SCM_RIGHTS hands them out
    where nothing else was opened meanwhile, in one close_range."""
    if fds and fds[-1] - fds[0] == len(fds) - 1 and fds == list(range(fds[0], fds[-1] + 1)):
        os.closerange(fds[0], fds[-1] + 1)
        return
    for fd in fds:
        _close(fd)


def _check_name(rel: str) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused("usage", f"file name {rel!r} is not valid UTF-8") from None


def zygote(sock: socket.socket) -> None:
    """Fork one helper per request: {"op": "spawn"} with the helper's socket attached,
    answered with its pid. The zygote itself never reads a path or a caller's input: it
    starts with the daemon, as the daemon's user, and only forks, so a helper costs a fork
    of a small single-threaded process rather than an interpreter's start."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps helpers as they exit
    while True:
        got = recv_frame(sock)
        if got is None:
            return  # the daemon went away
        _msg, fds = got
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            send_frame(sock, {"error": "protocol", "message": "spawn takes one socket"})
            continue
        pid = os.fork()
        if pid == 0:  # the helper
            code = 0
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                Helper(socket.socket(fileno=fds[0])).run()
            except BaseException:
                code = 1
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(fds[0])
        # The helper waits for the daemon's first frame and runs as root until then, so it
        # is still this pid: a pidfd of it lets the daemon reap or kill exactly it.
        pidfd = os.pidfd_open(pid)
        try:
            send_frame(sock, {"pid": pid}, [pidfd])
        finally:
            os.close(pidfd)


def main() -> int:
    """`python -m hostd.fsops FD`: the zygote, on the socket FD it was handed."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the daemon's group: it tells us
    try:
        zygote(sock)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

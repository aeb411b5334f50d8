"""The daemon's side of the helper process that acts with a caller's rights (fsops.py).

`AsUser.start(caller)` starts one helper for one operation; its methods are blocking calls
(run them in a thread) that return plain data or descriptors. The helper resolves paths in
the caller's mount namespace with the caller's uid, gid and groups; the daemon never opens a
caller's path itself. It does two things with what comes back: reads publish sources from
descriptors the helper opened, and hardlinks its own blobs into directories the helper made
(only the blob's owner may link it under fs.protected_hardlinks).

`Storage` keeps restores and publishes off hostd's own directories by (device, inode), so no
spelling of a path (symlinks, bind mounts, `..`) can aim one at a tier, the index or a
`file://` origin.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hostd
from hostd.caller import Caller
from hostd.errors import Forbidden, HostdError, TargetExists, UsageError
from hostd.fileio import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2
from hostd.frames import FrameError, recv_frame, send_frame

_PKG_PARENT = str(Path(hostd.__file__).resolve().parent.parent)
_ERRORS: dict[str, type[HostdError]] = {
    "usage": UsageError,
    "changed": UsageError,
    "gone": UsageError,
    "os": UsageError,
    "exists": TargetExists,
    "forbidden": Forbidden,
}


@dataclass(frozen=True, slots=True)
class TargetInfo:
    dev: int  # st_dev of the target's parent directory
    chain: list[tuple[int, int]]  # (dev, ino) of the parent and its ancestors
    existing: tuple[int, int] | None  # (dev, ino) of the target, if it exists


class Spawner:
    """Starts helpers. A zygote (fsops.zygote: a small single-threaded process of the daemon's
    user, started on first use) forks each one, so a helper costs a fork, not an
    interpreter's start; a zygote that died is started again. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        return f"Spawner(zygote={self._proc.pid if self._proc else None})"

    def spawn(self) -> tuple[socket.socket, int]:
        """A new helper: our end of its socket, and a pidfd of it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                pid = self._fork(theirs) or self._fork(theirs, restart=True)
            if not pid:
                raise HostdError("hostd cannot start its helper process (see the log)")
            return ours, os.pidfd_open(pid)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def _fork(self, theirs: socket.socket, restart: bool = False) -> int:
        if restart or self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start()
        assert self._sock is not None
        try:
            send_frame(self._sock, {"op": "spawn"}, [theirs.fileno()])
            got = recv_frame(self._sock)
        except (OSError, FrameError):
            return 0
        return int(got[0].get("pid", 0)) if got is not None else 0

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-m", "hostd.fsops", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={"PYTHONPATH": _PKG_PARENT, "PATH": os.defpath, "LC_ALL": "C.UTF-8"},
                cwd="/",
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the zygote exits when it sees us go
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()


class AsUser:
    """One helper process acting with one caller's rights. Thread-safe: calls take turns."""

    def __init__(self, caller: Caller, sock: socket.socket, pidfd: int) -> None:
        self.caller = caller
        self.sock = sock
        self.pidfd = pidfd
        self.root_fd = -1  # the caller's root directory (O_PATH), opened by the helper
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AsUser(uid={self.caller.uid})"

    @classmethod
    def start(cls, caller: Caller, spawner: Spawner) -> AsUser:
        """Start a helper and hand it the caller (blocking)."""
        try:
            pidfd = os.pidfd_open(caller.pid) if caller.pid > 0 else -1
        except ProcessLookupError:
            raise UsageError("the calling process went away") from None
        try:
            sock, helper = spawner.spawn()
            me = cls(caller, sock, helper)
            try:
                _, fds = me.call(
                    "init",
                    [pidfd] if pidfd >= 0 else [],
                    uid=caller.uid,
                    gid=caller.gid,
                    groups=list(caller.groups),
                    pid=caller.pid,
                )
                me.root_fd = fds[0]
            except BaseException:
                me.close()
                raise
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return me

    def call(
        self, op: str, fds: Sequence[int] = (), **fields: Any
    ) -> tuple[dict[str, Any], list[int]]:
        """One request and its answer; an answered error is raised as hostd's own."""
        with self._lock:
            try:
                send_frame(self.sock, {"op": op, **fields}, list(fds))
                got = recv_frame(self.sock)
            except (OSError, FrameError) as e:
                got = None
                cause: BaseException | None = e
            else:
                cause = None
        if got is None:
            raise HostdError(
                f"hostd's helper for uid {self.caller.uid} died during {op!r}"
            ) from cause
        reply, out = got
        if "error" in reply:
            for fd in out:
                os.close(fd)
            raise _ERRORS.get(str(reply["error"]), HostdError)(str(reply["message"]))
        return reply, out

    def close(self) -> None:
        """Tell the helper we are done (it removes an unfinished build) and wait for it to
        exit, killing it if it does not."""
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()
        try:
            if not select.select([self.pidfd], [], [], 30)[0]:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError:
            pass  # already gone
        finally:
            os.close(self.pidfd)

    # -- publish ---------------------------------------------------------------------------
    def source(self, path: str) -> list[tuple[int, int]]:
        """Resolve the directory to publish: (dev, ino) of it and of its ancestors."""
        reply, _ = self.call("source", path=path)
        return [(int(d), int(i)) for d, i in reply["chain"]]

    def scan(self) -> dict[str, Any]:
        """The source's files, symlinks (with where they lead) and empty directories."""
        reply, _ = self.call("scan")
        return reply

    def open_file(self, path: str, ident: Sequence[int], via: str | None) -> int:
        """A source file opened for reading with the caller's rights, checked to be the
        regular file the scan saw."""
        _, fds = self.call("open", path=path, id=list(ident), via=via)
        return fds[0]

    # -- restore ---------------------------------------------------------------------------
    def target(self, path: str, replace: bool) -> TargetInfo:
        reply, _ = self.call("target", path=path, replace=replace)
        existing = reply["target"]
        return TargetInfo(
            int(reply["dev"]),
            [(int(d), int(i)) for d, i in reply["chain"]],
            None if existing is None else (int(existing[0]), int(existing[1])),
        )

    def begin(self, dirs: Sequence[str], want: Sequence[str]) -> tuple[int, dict[str, int]]:
        """Make the build directory and `dirs` (parents first); descriptors of `want`."""
        reply, fds = self.call("begin", dirs=list(dirs), want=list(want))
        return int(reply["dev"]), dict(zip(want, fds, strict=True))

    def files(self, items: Sequence[tuple[str, int, int, str]], fds: Sequence[int]) -> None:
        self.call("files", fds, items=[list(i) for i in items])

    def symlinks(self, items: Iterable[tuple[str, str]]) -> None:
        self.call("symlinks", items=[list(i) for i in items])

    def commit(self, replace: bool) -> str | None:
        """Rename the tree into place; the path of an old tree that could not be removed."""
        reply, _ = self.call("commit", replace=replace)
        left = reply.get("old_tree_left")
        return None if left is None else str(left)

    def abort(self) -> None:
        self.call("abort")

    def open_in_view(self, path: Path) -> int:
        """One of the daemon's own directories as the caller's mount namespace sees it
        (O_PATH), or -1 where the caller cannot see it."""
        try:
            return openat2(
                self.root_fd,
                str(path),
                os.O_PATH | os.O_DIRECTORY,
                RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
            )
        except OSError:
            return -1

    def abandon(self) -> None:
        """Best effort abort on a failure path: a helper that is gone, or that fails here,
        removes its build anyway when it sees the daemon's end close."""
        with contextlib.suppress(HostdError, OSError):
            self.abort()


class Storage:
    """hostd's own directories: no restore target or publish source may lie inside one or
    contain one. Compared by (device, inode), looked up afresh at each check."""

    def __init__(self, paths: Iterable[tuple[str, Path]]) -> None:
        self.paths = list(paths)

    def __repr__(self) -> str:
        return f"Storage({', '.join(f'{k}={p}' for k, p in self.paths)})"

    def _ids(self) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str]]:
        inside: dict[tuple[int, int], str] = {}
        above: dict[tuple[int, int], str] = {}
        for what, p in self.paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            inside[(st.st_dev, st.st_ino)] = f"{what} {p}"
            for q in [p, *p.parents]:
                with contextlib.suppress(OSError):
                    st = os.stat(q)
                    above.setdefault((st.st_dev, st.st_ino), f"{what} {p}")
        return inside, above

    def check(
        self, what: str, chain: Sequence[tuple[int, int]], node: tuple[int, int] | None
    ) -> None:
        """`chain`: a directory and its ancestors; `node`: the directory acted on itself (a
        source, or a target that exists), which must not hold hostd's storage either."""
        inside, above = self._ids()
        for ident in chain:
            if ident in inside:
                raise UsageError(f"{what} lies inside hostd's own storage ({inside[ident]})")
        if node is not None and node in above:
            raise UsageError(f"{what} holds hostd's own storage ({above[node]})")

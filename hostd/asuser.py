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

import asyncio
import contextlib
import errno
import functools
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hostd
from hostd.caller import Caller
from hostd.errors import (
    Forbidden,
    HostdError,
    TargetError,
    TargetExists,
    TransientError,
    UsageError,
)
from hostd.fileio import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2
from hostd.frames import FrameError, recv_frame, send_frame

T = TypeVar("T")
CALL_TIMEOUT = 120.0  # seconds one request to a helper may take (a batch of copies, a scan)
CLOSE_GRACE = 10.0  # seconds a helper gets to clean up and exit before it is killed
_PKG_PARENT = str(Path(hostd.__file__).resolve().parent.parent)
log = logging.getLogger(__name__)

_ERRORS: dict[str, type[HostdError]] = {
    "usage": UsageError,
    "changed": UsageError,
    "gone": UsageError,
    "os": UsageError,
    "exists": TargetExists,
    "forbidden": Forbidden,
}
# What a filesystem answers when it cannot take what the request itself was right to ask.
# EPERM among them: an immutable or append-only file, a system call filter (the unit's
# SystemCallErrorNumber=EPERM), not only rights, so never told as the caller's (forbidden).
_TARGET_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EPERM}
)
# What it answers when the caller's own rights forbid it: exit 5, 403, as [access] would.
_FORBIDDEN_ERRNOS = frozenset({errno.EACCES})
# The ops whose answer a `landing` frame may come ahead of (fsops.Helper._landing).
_LANDING_OPS = frozenset({"files", "land", "symlinks"})


@dataclass
class Ledger:
    """What a progressive restore's helper says it placed, kept by the daemon: should the
    helper die, a new one takes that back (AsUser.reclaim)."""

    path: str  # the target
    target_id: list[int]  # its (dev, inode)
    made_target: bool
    made_dirs: list[str]
    # the (inode, ctime) of each file and symlink landed, by its path (the object the daemon
    # sent: a tree's paths are held once, by its manifest); ctime -1 (any): one of a batch
    # the helper was landing when last heard of (AsUser._placed)
    placed: dict[str, tuple[int, int]]
    keep: bool = False  # keep_partial: only the scratch files of what never landed go
    # A descriptor of the target, the daemon's, open while the restore claims it: its inode
    # cannot be freed meanwhile, so no new directory gets its number (the claim's key) should
    # the caller kill its helper and remove the target while the fetch goes on.
    pin: int = -1


@dataclass(frozen=True, slots=True)
class TargetInfo:
    dev: int  # st_dev of the target's parent directory
    chain: list[tuple[int, int]]  # (dev, ino) of the parent and its ancestors
    existing: tuple[int, int] | None  # (dev, ino) of the target, if it exists


class Spawner:
    """Starts helpers. A zygote (fsops.zygote: a small single-threaded process of the daemon's
    user, started with the daemon by `prestart`, else on first use) forks each one, so a
    helper costs a fork, not an interpreter's start; a zygote that died is started again.
    Thread-safe."""

    def __init__(self, workers: int = 64) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        # Calls to helpers block on a process the caller may stop: they get threads of their
        # own (one per operation in flight), never the loop's default pool.
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="hostd-asuser")
        # The targets progressive restores are filling, by (dev, inode), each with its
        # restore's ledger: one restore at a time in a target. Kept here, not as a lock on
        # the target, which any user who may open the target could take first (flock).
        self._filling: dict[tuple[int, int], Ledger] = {}
        self._filling_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a blocking call on a helper (or one that waits on a helper) in the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kw))

    async def start(self, caller: Caller, caller_pidfd: int = -1) -> AsUser:
        """AsUser.start in the pool; if we are cancelled meanwhile, the helper that starts
        anyway is closed rather than leaked."""
        job = asyncio.ensure_future(self.run(AsUser.start, caller, self, caller_pidfd))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_close_started)
            raise

    def __repr__(self) -> str:
        return f"Spawner(zygote={self._proc.pid if self._proc else None})"

    def claim(self, ledger: Ledger) -> bool:
        """Claim `ledger`'s target for its progressive restore: False where another
        restore's ledger holds it."""
        key = (ledger.target_id[0], ledger.target_id[1])
        with self._filling_lock:
            held = self._filling.setdefault(key, ledger)
        return held is ledger

    def release(self, ledger: Ledger) -> None:
        """Give up `ledger`'s claim on its target, if it holds one, and its pin."""
        key = (ledger.target_id[0], ledger.target_id[1])
        with self._filling_lock:
            if self._filling.get(key) is ledger:
                del self._filling[key]
            pin, ledger.pin = ledger.pin, -1
        if pin >= 0:
            os.close(pin)

    def spawn(self) -> tuple[socket.socket, int]:
        """A new helper: our end of its socket, and a pidfd of it (the zygote's)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                pidfd = self._fork(theirs)
                if pidfd < 0:
                    pidfd = self._fork(theirs, restart=True)
            if pidfd < 0:
                raise HostdError("hostd cannot start its helper process (see the log)")
            return ours, pidfd
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def prestart(self) -> None:
        """Start the zygote now, not at the first helper's need: its interpreter starts
        (~0.1 s of CPU) beside the daemon's own start rather than in a caller's first publish
        or restore, and it is the code the daemon started with, whatever is installed later.
        HostdError if it cannot be started."""
        with self._lock:
            self._running()

    def _running(self, restart: bool = False) -> None:
        if restart or self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._start()

    def _fork(self, theirs: socket.socket, restart: bool = False) -> int:
        self._running(restart)
        assert self._sock is not None
        try:
            send_frame(self._sock, {"op": "spawn"}, [theirs.fileno()])
            got = recv_frame(self._sock)
        except (OSError, FrameError):
            return -1
        if got is None:
            return -1
        _, fds = got
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else -1

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-m", "hostd.fsops", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={
                    "PYTHONPATH": _PKG_PARENT,
                    "PATH": os.defpath,
                    "LC_ALL": "C.UTF-8",
                    # HOSTD_NATIVE=0 makes the helper use fastcopy's pure-Python twin
                    **{k: v for k, v in os.environ.items() if k == "HOSTD_NATIVE"},
                },
                cwd="/",
            )
        except OSError as e:
            ours.close()
            raise HostdError(
                f"hostd cannot start its helper process ({sys.executable} -m hostd.fsops): "
                f"{e.strerror or e}"
            ) from e
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
        self.pool.shutdown(wait=False, cancel_futures=True)


def _close_started(job: asyncio.Future[AsUser]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()


class AsUser:
    """One helper process acting with one caller's rights. Thread-safe: calls take turns
    sending and are answered in that order (`call`)."""

    def __init__(
        self, caller: Caller, sock: socket.socket, pidfd: int, spawner: Spawner | None = None
    ) -> None:
        self.caller = caller
        self.spawner = spawner  # where a successor comes from, should this one die
        self.sock = sock
        # A helper the caller stopped (it runs as the caller, who may signal it) must not
        # hold a daemon thread for ever: no single call takes this long.
        self.sock.settimeout(CALL_TIMEOUT)
        self.pidfd = pidfd
        self.root_fd = -1  # the caller's root directory (O_PATH), opened by the helper
        self._sending = threading.Lock()
        self._answers = threading.Condition()  # whose turn it is to read an answer
        self._sent = self._answered = 0  # requests sent, answers read
        self.target_path = ""
        self.building = False  # a build directory beside the target, from `begin`
        self.ledger: Ledger | None = None  # a progressive restore's, from `begin`

    def __repr__(self) -> str:
        return f"AsUser(uid={self.caller.uid})"

    @classmethod
    def start(
        cls, caller: Caller, spawner: Spawner, caller_pidfd: int = -1, *, root_fd: int = -1
    ) -> AsUser:
        """Start a helper and hand it the caller (blocking). `caller_pidfd` pins the calling
        process (SO_PEERPIDFD, taken from the connection: it cannot name a later process
        that reuses the pid); without one, a pidfd of the pid is opened here. `root_fd`: the
        caller's root as an earlier helper of this caller opened it (`root_fd`), for work
        that must be done even where the caller is gone (`reclaim`); the helper then keeps
        none of a root caller's capabilities, which it can no longer read."""
        given = root_fd >= 0  # (else a pidfd of the caller is handed over)
        try:
            if given:
                handed = os.dup(root_fd)
            elif caller_pidfd >= 0:
                handed = os.dup(caller_pidfd)
            else:
                handed = os.pidfd_open(caller.pid) if caller.pid > 0 else -1
        except ProcessLookupError:
            raise UsageError("the calling process went away") from None
        try:
            sock, helper = spawner.spawn()
            me = cls(caller, sock, helper, spawner)
            try:
                _, fds = me.call(
                    "init",
                    [handed] if handed >= 0 else [],
                    nfds=1,
                    uid=caller.uid,
                    gid=caller.gid,
                    groups=list(caller.groups),
                    pid=caller.pid,
                    root=given,  # the descriptor is the root itself, not a pidfd
                )
                me.root_fd = fds[0]
            except BaseException:
                me.close()
                raise
        finally:
            if handed >= 0:
                os.close(handed)
        return me

    def call(
        self,
        op: str,
        fds: Sequence[int] = (),
        nfds: int = 0,
        heard: Callable[[dict[str, Any]], object] | None = None,
        **fields: Any,
    ) -> tuple[dict[str, Any], list[int]]:
        """One request and its answer; an answered error is raised as hostd's own, after
        `heard` (where given) has seen it, as it sees every answer.

        Calls from several threads are pipelined: each sends its request in turn, without
        waiting for the answers to those sent before, then takes its own answer in the
        order sent (the helper reads and answers in order). A batch of copies sent while
        the helper creates the one before waits on its socket, not on a round trip through
        the daemon's threads (each return from a blocking call takes the GIL back, which
        can take a switch interval while another thread holds it)."""
        with self._sending:
            try:
                send_frame(self.sock, {"op": op, **fields}, list(fds))
            except (OSError, FrameError, ValueError) as e:
                raise self._gone(op) from e
            ticket = self._sent
            self._sent += 1
        with self._answers:
            self._answers.wait_for(lambda: self._answered == ticket)
            try:
                return self._answer(op, nfds, heard)
            finally:
                self._answered += 1
                self._answers.notify_all()

    def _answer(
        self, op: str, nfds: int, heard: Callable[[dict[str, Any]], object] | None
    ) -> tuple[dict[str, Any], list[int]]:
        # One frame may come ahead of a batch's answer: its `landing` (_placed), without
        # descriptors. Any other (a second one, one before an op that lands nothing, an answer
        # that says `landing`) is out of turn: answers are paired with requests by order, so
        # neither it nor any after it can be taken for an answer.
        ahead = op in _LANDING_OPS
        while True:
            try:
                got = recv_frame(self.sock)
            except (OSError, FrameError, ValueError) as e:
                raise self._gone(op) from e
            if got is None:
                raise self._gone(op)
            reply, out = got
            if "landing" in reply and (not ahead or out):
                for fd in out:
                    os.close(fd)
                raise self._gone(op)
            if heard is not None:
                try:
                    heard(reply)
                except BaseException:
                    for fd in out:
                        os.close(fd)
                    raise
            if "landing" not in reply:
                break
            ahead = False
        if "error" in reply or len(out) != nfds:
            for fd in out:
                os.close(fd)
        if "error" in reply:
            kind = str(reply["error"])
            cls = _ERRORS.get(kind, HostdError)
            if kind == "os" and reply.get("errno") in _TARGET_ERRNOS:
                cls = TargetError  # the caller's filesystem failed the write, not the request
            elif kind == "os" and reply.get("errno") in _FORBIDDEN_ERRNOS:
                cls = Forbidden
            raise cls(str(reply["message"]))
        if len(out) != nfds:
            raise HostdError(f"hostd's helper answered {op!r} with {len(out)} descriptors")
        return reply, out

    def _gone(self, op: str) -> TransientError:
        # An answer lost (over its time, or the stream broken): answers are paired with
        # requests by order, so the next call would take this one's late answer for its own
        # (a batch told created that is not). The helper goes, and every later call fails at
        # once; what it placed is taken back by a successor (abandon).
        self.kill()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return TransientError(
            f"hostd's helper for uid {self.caller.uid} stopped answering during {op!r} "
            "(killed, stopped, or over its time)"
        )

    def kill(self) -> None:
        """Stop a helper that no longer answers (the caller may have stopped it)."""
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def stopped(self) -> bool:
        """Kill the helper and wait until it is gone, its descriptors closed (the locks it
        held released): False if it is not within CLOSE_GRACE."""
        self.kill()
        return _exits(self.pidfd, CLOSE_GRACE)  # (a pidfd closed already: gone)

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
            if not _exits(self.pidfd, CLOSE_GRACE):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError:
            pass  # already gone
        finally:
            os.close(self.pidfd)
            if self.ledger is not None and self.spawner is not None:
                self.spawner.release(self.ledger)  # (once its helper has taken back, or died)

    # -- publish ---------------------------------------------------------------------------
    def source(self, path: str) -> list[tuple[int, int]]:
        """Resolve the directory to publish: (dev, ino) of it and of its ancestors."""
        reply, _ = self.call("source", path=path)
        return [(int(d), int(i)) for d, i in reply["chain"]]

    def scan(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> dict[str, Any]:
        """The source's files, symlinks (with where they lead) and empty directories, as the
        filters keep them (core/pathfilter.py), and the special files it `skipped`."""
        reply, _ = self.call("scan", include=list(include), exclude=list(exclude))
        return reply

    def open_file(self, path: str, ident: Sequence[int], via: str | None) -> int:
        """A source file opened for reading with the caller's rights, checked to be the
        regular file the scan saw."""
        return self.open_files([(path, ident, via)])[0]

    def open_files(self, items: Sequence[tuple[str, Sequence[int], str | None]]) -> list[int]:
        """`open_file` for a batch of (path, (dev, ino), via), in one round trip."""
        _, fds = self.call("open", nfds=len(items), items=[[p, list(i), v] for p, i, v in items])
        try:
            for (path, ident, _), fd in zip(items, fds, strict=True):
                try:
                    st = os.fstat(fd)
                except OSError as e:  # (a FUSE mount of the caller's without allow_other)
                    raise UsageError(
                        f"cannot publish {path!r}: hostd cannot read it ({e.strerror}); a "
                        "FUSE filesystem must be mounted with allow_other for hostd to read it"
                    ) from None
                if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != tuple(ident):
                    # a helper that lied: never read what it handed over
                    raise HostdError(f"hostd's helper handed over something else for {path!r}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    # -- restore ---------------------------------------------------------------------------
    def target(self, path: str, replace: bool) -> TargetInfo:
        reply, _ = self.call("target", path=path, replace=replace)
        self.target_path = path
        existing = reply["target"]
        return TargetInfo(
            int(reply["dev"]),
            [(int(d), int(i)) for d, i in reply["chain"]],
            None if existing is None else (int(existing[0]), int(existing[1])),
        )

    def begin(
        self,
        dirs: Sequence[str],
        want: Sequence[str],
        *,
        progressive: bool = False,
        keep: bool = False,
    ) -> tuple[int, dict[str, int]]:
        """Make the build directory and `dirs` (parents first); descriptors of `want`.
        `progressive`: build in the target itself, made now; each file then lands whole as
        it is sent, and a failure removes what was placed unless `keep`."""
        if not progressive:
            reply, fds = self.call("begin", nfds=len(want), dirs=list(dirs), want=list(want))
            self.building = True
            return int(reply["dev"]), dict(zip(want, fds, strict=True))
        # The target first, held for this restore before anything is made in it.
        reply, pin = self.call("begin", nfds=1, dirs=[], want=[], progressive=True, keep=keep)
        try:
            ledger = Ledger(
                self.target_path,
                [int(x) for x in reply["target_id"]],
                bool(reply["made_target"]),
                [],
                {},
                keep,
                pin[0],
            )
            try:
                st: os.stat_result | None = os.fstat(ledger.pin)
            except PermissionError:  # (a caller's FUSE mount: not ours to look at)
                st = None
            if st is not None and [st.st_dev, st.st_ino] != ledger.target_id:
                raise HostdError("hostd's helper answered 'begin' with another directory")
        except BaseException:
            os.close(pin[0])
            raise
        if self.spawner is not None and not self.spawner.claim(ledger):
            os.close(ledger.pin)
            self.call("abort", linked=[], refused=True)  # (a target it made is the other's)
            raise TargetExists(
                f"target {self.target_path!r} is being filled by another progressive restore"
            )
        self.ledger = ledger
        asked = set(dirs)  # the helper answers for these alone (it may lie about them)
        # Until the answer says which it made, any of them may be there: a helper killed
        # while it makes them leaves no directory its successor does not name (each is
        # removed only where empty, and the target held by this restore was empty).
        ledger.made_dirs.extend(dirs)

        def heard(answer: dict[str, Any]) -> None:  # (a failed one too: those made before)
            made = answer.get("made_dirs")
            del ledger.made_dirs[:]
            if type(made) is list:
                ledger.made_dirs.extend(d for d in made if type(d) is str and d in asked)

        _, fds = self.call("dirs", nfds=len(want), heard=heard, dirs=list(dirs), want=list(want))
        return int(reply["dev"]), dict(zip(want, fds, strict=True))

    def files(
        self, items: Sequence[tuple[str, int, int, str, int | None]], fds: Sequence[int]
    ) -> None:
        """Create files (path, mode, size, "copy" or "empty", mtime or None); each "copy"
        takes the next of `fds` as its source. A failed batch that landed some of its files
        (a progressive restore's) raises with their paths as the error's `landed`."""
        sent = [i[0] for i in items]
        landed: list[str] = []

        def heard(reply: dict[str, Any]) -> None:
            landed.extend(self._placed(sent, reply))

        try:
            self.call("files", fds, heard=heard, items=[list(i) for i in items])
        except HostdError as e:
            e.landed = landed  # type: ignore[attr-defined]
            raise

    def reopen(self, paths: Sequence[str]) -> list[int]:
        """Descriptors, open for reading, of files this restore made (relative to the
        target); the caller closes them."""
        _, fds = self.call("reopen", nfds=len(paths), paths=list(paths))
        return fds

    def parts(self, paths: Sequence[str]) -> tuple[list[str], list[int]]:
        """Make a progressive restore's files that the daemon writes in ranges, each under
        a scratch name: those names (relative to the target) and a descriptor of each, open
        for writing. Each lands with `land`; an abort removes those that did not."""
        reply, fds = self.call("parts", nfds=len(paths), paths=list(paths))
        names = reply.get("parts")
        if type(names) is not list or len(names) != len(paths):
            for fd in fds:
                os.close(fd)
            raise HostdError("hostd's helper answered 'parts' without a name for each file")
        return [str(n) for n in names], fds

    def land(self, items: Sequence[tuple[str, int, int | None]]) -> None:
        """Land files `parts` made, now whole: (path, mode, mtime or None) each."""
        heard = functools.partial(self._placed, [i[0] for i in items])
        self.call("land", heard=heard, items=[list(i) for i in items])

    def symlinks(self, items: Iterable[tuple[str, str]]) -> None:
        sent = list(items)
        heard = functools.partial(self._placed, [i[0] for i in sent])
        self.call("symlinks", heard=heard, items=[list(i) for i in sent])

    def _placed(self, sent: list[str], reply: dict[str, Any]) -> list[str]:
        """Keep what the helper says it placed (a failed batch too, half landed): of the
        paths sent, their inodes and ctimes. Those paths, as the daemon sent them.

        A batch's `landing`, which comes before its renames, is kept by inode alone (a
        rename moves the ctime): killed before its answer, the helper may have landed any
        of it. The answer then says what did land."""
        ours = {p: p for p in sent}  # (a lying helper names nothing else)
        ledger = self.ledger if self.ledger is not None and not self.ledger.keep else None
        if type(reply.get("landing")) is list:
            for item in reply["landing"]:
                if type(item) is list and len(item) == 2 and type(item[1]) is int:
                    path = ours.get(item[0]) if type(item[0]) is str else None
                    if path is not None and ledger is not None:
                        ledger.placed[path] = (item[1], -1)
            return []
        if ledger is not None:  # (what it was landing and did not: not there)
            for p in sent:
                if ledger.placed.get(p, (0, 0))[1] == -1:
                    del ledger.placed[p]
        if type(reply.get("placed")) is not list:
            return []
        out = []
        for item in reply["placed"]:
            if type(item) is list and len(item) == 3 and all(type(x) is int for x in item[1:]):
                path = ours.get(item[0]) if type(item[0]) is str else None
                if path is not None:
                    out.append(path)
                    if ledger is not None:
                        ledger.placed[path] = (item[1], item[2])
        return out

    def commit(self, replace: bool) -> str | None:
        """Rename the tree into place; the path of an old tree that could not be removed."""
        reply, _ = self.call("commit", replace=replace)
        left = reply.get("old_tree_left")
        return None if left is None else str(left)

    def abort(self, linked: Sequence[tuple[str, int]] = ()) -> None:
        """Remove the build, or what a progressive restore placed: the helper's own files
        and `linked`, the (path, inode) of each link the daemon made."""
        self.call("abort", linked=[list(x) for x in linked])

    def unplace(self, paths: Sequence[str]) -> None:
        """Take back files a progressive restore placed, whatever it was asked to keep."""
        self.call("unplace", paths=list(paths))
        if self.ledger is not None:
            for p in paths:
                self.ledger.placed.pop(p, None)

    def linking(self, items: Sequence[tuple[str, int]]) -> None:
        """Tell a progressive restore's helper of links about to be made in the target,
        (path, the blob's inode) each: its own abort takes them back too."""
        self.call("linking", items=[list(i) for i in items])

    def sweep(self, path: str) -> None:
        """Remove the build directories beside target `path` that no restore holds."""
        self.call("sweep", path=path)

    def reclaim(self, ledger: Ledger, linked: Sequence[tuple[str, int]]) -> None:
        """Take back what a progressive restore whose helper died placed (that helper's
        `ledger`, and the daemon's `linked`), as this caller: only names still holding the
        inode placed there; then the directories it made, and the target, where empty.
        Refused where another progressive restore fills that target now."""
        if self.spawner is not None and not self.spawner.claim(ledger):
            raise TargetExists(
                f"target {ledger.path!r} is being filled by another progressive restore"
            )
        try:
            self.call(
                "reclaim",
                path=ledger.path,
                target_id=ledger.target_id,
                made_target=ledger.made_target,
                made_dirs=ledger.made_dirs,
                placed=[[p, ino, ctime] for p, (ino, ctime) in ledger.placed.items()],
                linked=[list(x) for x in linked],
                keep=ledger.keep,
            )
        finally:
            if self.spawner is not None:
                self.spawner.release(ledger)  # that restore is over, taken back

    def open_in_view(self, path: str | Path) -> int:
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

    def abandon(self, linked: Sequence[tuple[str, int]] = ()) -> bool:
        """Best effort abort on a failure path: a helper that fails here removes its build
        anyway when it sees the daemon's end close. False where it did not answer (gone,
        killed): a successor as the same caller then takes back what it left (`_succeed`).
        `linked`: the daemon's links into a progressive restore's target, (path, inode)."""
        try:
            self.abort(linked)
        except (TransientError, OSError, FrameError):
            self._succeed(linked)
            return False
        except HostdError:
            pass
        return True

    def _succeed(self, linked: Sequence[tuple[str, int]]) -> None:
        """This helper died (killed, out of memory) mid-restore: a new one, as the caller,
        in the root this one opened (the caller may be gone too: kill -9 -1), takes back a
        progressive restore's files (`reclaim`) or removes the build directory (`sweep`).
        Blocking; failures are logged."""
        if (self.ledger is None and not self.building) or self.spawner is None:
            return
        where = self.ledger.path if self.ledger is not None else self.target_path
        # Gone for sure, its locks on the target or the build released, not merely slow.
        if not self.stopped():
            log.warning("could not clean up the restore into %s: its helper lives on", where)
            return
        try:
            fresh = AsUser.start(self.caller, self.spawner, root_fd=self.root_fd)
        except (HostdError, OSError) as e:
            log.warning("could not clean up the restore into %s: %s", where, e)
            return
        try:
            if self.ledger is not None:
                fresh.reclaim(self.ledger, linked)
            else:
                fresh.sweep(self.target_path)
        except (HostdError, OSError) as e:
            log.warning("could not clean up the restore into %s: %s", where, e)
        finally:
            fresh.close()


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
            # and the directories below (blobs/, blobs/ab/, tmp/, manifests/...), which may be
            # bind-mounted elsewhere on their own: `..` from such a mount never leads here
            for sub in _subdirs(p, depth=2 if what.startswith("tier") else 1):
                inside.setdefault(sub, f"{what} {p}")
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


def _subdirs(p: Path, depth: int) -> list[tuple[int, int]]:
    """(dev, ino) of the directories below `p`, `depth` levels deep (symlinks not followed)."""
    out: list[tuple[int, int]] = []
    try:
        with os.scandir(p) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    out.append((st.st_dev, st.st_ino))
                    if depth > 1:
                        out += _subdirs(Path(e.path), depth - 1)
    except OSError:
        pass
    return out


def _exits(pidfd: int, seconds: float) -> bool:
    """Whether the process of `pidfd` has exited, or does within `seconds` (or the pidfd is
    no longer open). By poll, not select: a restore that holds a thousand blob descriptors
    gets a helper whose pidfd is past 1023, which select refuses (ValueError)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(seconds * 1000))

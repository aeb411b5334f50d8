"""The socket's front desk: `GET /v1/status` answered off the event loop.

While a restore of 100,000 files runs, the loop's steps are milliseconds long (fill workers,
flights, admissions), and a status request waits its turn: 30-40 ms at p99, against 1 ms
idle. A monitor that asks "is hostd alive, what is it doing" should not wait for the work.

So one thread, the desk, accepts every connection on the socket. It peeks at what came
(MSG_PEEK: nothing is taken from the connection), and:

- a whole, plain `GET /v1/status` head (`_status_request`: strictly formed, no body, nothing
  sent after it yet) from a caller who may ask for it: answered here, from the status the
  loop last rendered (`Board`) and the caller's own part;
- anything else, and a request whose head has not come whole within HAND_OVER_AFTER: handed
  to aiohttp on the loop as it came (`loop.connect_accepted_socket`), which answers it as it
  answers every request, errors (400, 403, 404, 405, timeouts) included.

A connection the desk answered that stays open waits with the desk for its next request.

Two desks keep that contract: `NativeDesk`, a thread in C (native/desk.c) that never takes
the GIL, where the extension hostd._desk is built and the environment's `HOSTD_NATIVE` is
not `0` (as hostd/fastcopy.py chooses); else `Desk`, its twin in Python, whose thread needs
the GIL for every step: while a restore keeps the loop and the workers busy it waits its
turn for each (2.5-3.5 ms a status at the median, 20-26 ms at p99 during a cold
small-file restore on 2 cores; the native desk 0.3-0.4 ms and 5-8 ms; a trivial server in
a process of its own 0.3-0.5 ms and 2-4 ms; bench/status_load.py). `desk_kind` picks one.

Freshness. The loop renders the status at the start and end of every operation (before the
operation's last event is sent, so whoever just saw one end is told it ended), at a reload,
and every STALE_AFTER / 2 while status requests keep coming. The desk answers a rendering
at most STALE_AFTER old; an older one (the first request after a quiet spell, or a loop too
busy to keep to its timer) is asked of the loop and waited for FRESH_WAIT at most. If the loop
has not rendered by then, the older rendering is answered: `status_age` (seconds) says how
old, so a stalled loop shows as a growing `status_age`, not as a status that never comes.
`uptime` is the desk's own clock.
"""

from __future__ import annotations

import abc
import array
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import select
import socket
import termios
import threading
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any

from hostd import access
from hostd.caller import Caller, peer_caller
from hostd.config import AccessConfig

log = logging.getLogger(__name__)

HAND_OVER_AFTER = 0.05  # a head not whole by then goes to the loop (a slow client's is)
STALE_AFTER = 0.25  # the oldest rendering answered without asking the loop for a new one
FRESH_WAIT = 0.05  # how long the desk waits for the loop's new rendering
KEEP_FRESH_FOR = 2.0  # the loop renders on a timer while status was asked this recently
MAX_HEAD = 8192  # a status request's head is a few hundred bytes; longer: the loop's
# A status is a few KiB (a large peer list makes it more). The desk answers only into a
# connection with nothing queued to its client, so an answer always fits in the socket's
# buffer (over 200 KiB on Linux) at once; a longer one is the loop's to send.
MAX_ANSWER = 64 * 1024
ACCEPT_PAUSE = 1.0  # out of descriptors: accept again after this (as asyncio does)
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_STATUS = b"GET /v1/status"
# What the desk answers itself, in the strictest reading of HTTP/1.1 (RFC 9112): a request
# line for /v1/status (a query of visible characters allowed), header names that are tokens,
# values of visible characters, spaces and tabs. Anything else, the loop's parser judges.
_REQUEST_LINE = re.compile(rb"GET /v1/status(?:\?[\x21-\x7e]*)? HTTP/1\.([01])")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e\x80-\xff]|[ \t])*)")
_ET = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET


def _load() -> tuple[types.ModuleType | None, str]:
    """The compiled module, or None and why not."""
    try:
        from hostd import _desk
    except ImportError as e:
        return None, f"the extension hostd._desk was not built ({e})"
    return _desk, ""


_EXT, WHY_NOT_NATIVE = _load()
NATIVE = _EXT is not None and os.environ.get("HOSTD_NATIVE") != "0"


class Board:
    """The daemon's status as the loop last rendered it, read by the desk's thread.

    `render` runs on the loop only (it reads the loop's structures); the desk reads the
    rendering, one tuple replaced whole, from its thread."""

    def __init__(self, render: Callable[[], dict[str, Any]], started: float) -> None:
        self._render = render
        self.started = started  # time.monotonic() at the daemon's start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: tuple[dict[str, Any], float] = ({}, -1.0)
        self._rendered = threading.Event()
        self._asked_at = -KEEP_FRESH_FOR  # when the desk last read the board
        self._timer: asyncio.TimerHandle | None = None
        # A native desk's: where each rendering goes, and when it was last asked for one.
        self.post: Callable[[dict[str, Any], float], None] | None = None
        self.asked_at: Callable[[], float] = lambda: self._asked_at

    def __repr__(self) -> str:
        return f"Board(age={time.monotonic() - self._current[1]:.3f}s)"

    def refresh(self) -> dict[str, Any]:
        """Render the status now (on the loop) and post it; the rendering. While status is
        asked for, the next rendering is due in STALE_AFTER / 2."""
        loop = self._loop = asyncio.get_running_loop()
        doc = self._render()
        now = time.monotonic()
        self._current = (doc, now)
        self._rendered.set()
        if self.post is not None:
            try:  # (a rendering the native desk cannot take fails its status, not the caller)
                self.post(doc, now)
            except Exception:
                log.exception("posting the status to the socket's desk failed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if now - self.asked_at() < KEEP_FRESH_FOR:
            self._timer = loop.call_later(STALE_AFTER / 2, self.refresh)
        return doc

    @property
    def current(self) -> tuple[dict[str, Any], float]:
        """The last rendering and its time.monotonic()."""
        return self._current

    def stop(self) -> None:
        """On the loop: no more timed renderings."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def read(self) -> tuple[dict[str, Any], float]:
        """The rendering to answer and its age in seconds (the desk's thread): at most
        STALE_AFTER old, or the newest the loop made within FRESH_WAIT of being asked."""
        self._asked_at = time.monotonic()
        doc, at = self._current
        if self._asked_at - at > STALE_AFTER and self._loop is not None:
            self._rendered.clear()
            try:
                self._loop.call_soon_threadsafe(self.refresh)
            except RuntimeError:  # the loop is closed: stopping
                pass
            else:
                self._rendered.wait(FRESH_WAIT)
            doc, at = self._current
        return doc, time.monotonic() - at


def answer(board: Board, doc: dict[str, Any], age: float, caller_part: dict[str, Any]) -> bytes:
    """A status body: the rendering, then the uptime now, its age, and the caller's part
    (as the native desk writes it: the rendering's JSON, those three keys appended)."""
    out = {
        **doc,
        "uptime": round(time.monotonic() - board.started, 3),
        "status_age": round(age, 3),
        "caller": caller_part,
    }
    return json.dumps(out).encode()


def caller_part(config: AccessConfig, euid: int, caller: Caller) -> dict[str, Any]:
    """What a status tells its caller about itself: its credentials and classes."""
    return {**caller.to_json(), "classes": list(access.classes(config, euid, caller))}


def desk_kind() -> type[Desk] | type[NativeDesk]:
    """The desk to accept on the socket (see the module's doc): the native one where it can
    be had (NATIVE), else the twin."""
    return NativeDesk if NATIVE else Desk


class _Front(abc.ABC):
    """What both desks do on the loop: serve the connections they hand over, and accept on
    the socket themselves once a desk has failed. Each desk sets itself up in `_set_up`."""

    def __init__(
        self,
        listener: socket.socket,
        board: Board,
        access_config: Callable[[], AccessConfig],
        euid: int,
        factory: Callable[[], asyncio.Protocol],
        answered_factory: Callable[[], asyncio.Protocol] | None = None,
    ) -> None:
        self._listener = listener
        self._board = board
        self._access = access_config
        self._euid = euid
        self._factory = factory
        # for a connection the desk answered a request on: its next head is no first one
        self._answered_factory = answered_factory or factory
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._steps: set[asyncio.Task[Any]] = set()
        self._fallback: asyncio.Server | None = None
        listener.setblocking(False)
        self._set_up()

    @abc.abstractmethod
    def _set_up(self) -> None:
        """The desk's own parts, made at the end of __init__ (the shared ones are set)."""

    async def _stopped(self) -> None:
        """The end of a stop, once the desk's thread is gone."""
        if self._steps:
            await asyncio.wait(self._steps)
        if self._fallback is not None:
            self._fallback.close()
        self._listener.close()

    # -- on the loop ----------------------------------------------------------------------

    def _adopt(self, conn: socket.socket, answered: bool) -> None:
        """aiohttp serves `conn` from here on (`answered`: the desk answered on it before)."""
        factory = self._answered_factory if answered else self._factory

        async def adopt() -> None:
            try:
                await self._loop.connect_accepted_socket(factory, conn)
            except Exception as e:
                log.warning("handing a connection to the loop failed: %s", e)
                conn.close()

        self._step(adopt())

    def _adopt_fd(self, fd: int, answered: bool) -> None:
        """`_adopt` of a connection handed over as a descriptor (a Unix stream socket)."""
        self._adopt(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd), answered)

    def _fall_back(self) -> None:
        """The desk failed: the loop accepts on the socket itself."""

        async def fall_back() -> None:
            if not self._stopping:
                self._fallback = await self._loop.create_unix_server(
                    self._factory, sock=self._listener
                )

        self._step(fall_back())

    def _step(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)


class NativeDesk(_Front):
    """The desk in C (native/desk.c): a thread that never takes the GIL. It is told each
    rendering of the status (Board.post), with the `[access]` lists as they stand, and tells
    the loop through `notify_fd` what is the loop's: a connection handed over, a rendering
    asked for, a pause in accepting (out of descriptors), or its own failure."""

    def _set_up(self) -> None:
        self._posted_access: AccessConfig | None = None
        from hostd import _desk

        self._ext = _desk
        self._native = _desk.Desk(
            self._listener.fileno(),
            self._board.started,
            self._euid,
            HAND_OVER_AFTER,
            STALE_AFTER,
            FRESH_WAIT,
            ACCEPT_PAUSE,
            MAX_HEAD,
            MAX_ANSWER,
        )
        self._board.post = self._tell
        self._board.asked_at = self._native.asked_at
        doc, at = self._board.current
        if doc:
            self._tell(doc, at)

    def __repr__(self) -> str:
        return f"NativeDesk(answered={self.answered}, handed={self.handed})"

    @property
    def answered(self) -> int:
        """Status requests answered by the desk."""
        return self._native.answered

    @property
    def handed(self) -> int:
        """Connections handed to the loop."""
        return self._native.handed

    def start(self) -> None:
        self._loop.add_reader(self._native.notify_fd, self._take)
        self._native.start()

    async def stop(self) -> None:
        """Stop accepting; connections neither answered nor handed over yet are closed."""
        self._stopping = True
        self._board.stop()
        self._board.post = None
        self._loop.remove_reader(self._native.notify_fd)
        await asyncio.to_thread(self._native.stop)
        for kind, fd, answered in self._native.take():  # handed over, not adopted yet
            if kind == self._ext.HAND_OVER:  # (served as the twin's are: the loop has them)
                self._adopt_fd(fd, answered)
        await self._stopped()

    def _tell(self, doc: dict[str, Any], at: float) -> None:
        """Post a rendering to the native desk (Board.post), with the [access] lists."""
        config = self._access()
        if config is not self._posted_access:  # (a reload makes a new one)
            self._native.set_access(*(access.lists(config, c) for c in access.CLASSES))
            self._posted_access = config
        self._native.post(json.dumps(doc).encode(), at)

    def _take(self) -> None:
        for kind, fd, answered in self._native.take():
            if kind == self._ext.HAND_OVER:
                self._adopt_fd(fd, answered)
            elif kind == self._ext.RENDER:
                # (as the twin's call_soon_threadsafe does: a failed rendering is logged, and
                # the records after it in this batch, connections handed over, still served)
                try:
                    self._board.refresh()
                except Exception:
                    log.exception("rendering the status failed")
            elif kind == self._ext.PAUSED:
                _paused(OSError(fd, os.strerror(fd)))
            elif kind == self._ext.FAILED:
                log.error(
                    "the socket's desk failed (%s): the loop answers every request from now",
                    os.strerror(fd),
                )
                self._fall_back()


class Desk(_Front):
    """The desk's twin in Python: the thread that accepts the socket's connections (see the
    module's doc)."""

    def _set_up(self) -> None:
        self._answered_on: set[int] = set()  # fds of held connections the desk answered on
        self._wake_r, self._wake_w = socket.socketpair()
        # The connections the desk holds: fd -> (socket, when it goes to the loop).
        self._held: dict[int, tuple[socket.socket, float]] = {}
        self._epoll = select.epoll()
        self.answered = 0  # status requests answered here
        self.handed = 0  # connections handed to the loop
        self._thread = threading.Thread(target=self._run, name="hostd-desk", daemon=True)

    def __repr__(self) -> str:
        return f"Desk(answered={self.answered}, handed={self.handed})"

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop accepting; connections neither answered nor handed over yet are closed."""
        self._stopping = True
        self._board.stop()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        await asyncio.to_thread(self._thread.join)
        for s in (self._wake_r, self._wake_w):
            s.close()
        self._epoll.close()
        await self._stopped()

    # -- the desk's thread ----------------------------------------------------------------

    def _run(self) -> None:
        ep = self._epoll
        listener, wake = self._listener.fileno(), self._wake_r.fileno()
        ep.register(listener, select.EPOLLIN)
        ep.register(wake, select.EPOLLIN)
        resume = 0.0  # accepting paused until then (out of descriptors)
        try:
            while not self._stopping:
                now = time.monotonic()
                if resume and now >= resume:
                    ep.register(listener, select.EPOLLIN)
                    resume = 0.0
                due = [until for _, until in self._held.values()]
                if resume:
                    due.append(resume)
                timeout = max(0.0, min(due) - now) if due else -1.0
                for fd, _ in ep.poll(timeout):
                    if fd == wake:
                        continue
                    if fd == listener:
                        resume = self._accept()
                        if resume:
                            ep.unregister(listener)
                        continue
                    held = self._held.get(fd)
                    if held is not None:
                        self._serve(held[0])
                now = time.monotonic()
                for conn, until in list(self._held.values()):
                    if until <= now:
                        self._hand_over(conn)
        except Exception:
            log.exception("the socket's desk failed: the loop answers every request from now")
            for conn, _ in list(self._held.values()):
                self._hand_over(conn)
            self._post(self._fall_back)
        finally:
            for conn, _ in list(self._held.values()):
                self._let_go(conn)
                conn.close()

    def _accept(self) -> float:
        """Accept what is queued; 0, or when to accept again after running out of
        descriptors (the queued connections wait in the backlog meanwhile, rather than the
        thread spinning on a listener that stays readable)."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return 0.0
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    raise
                _paused(e)
                return time.monotonic() + ACCEPT_PAUSE
            conn.setblocking(False)
            self._hold(conn)
            self._serve(conn)  # (edge-triggered: what came before registering counts too)

    def _hold(self, conn: socket.socket) -> None:
        """Hold `conn` until its next request is whole, HAND_OVER_AFTER at most. Watched
        edge-triggered: a head that is not whole yet wakes the desk again only when more of
        it comes, not at every turn while it sits unread."""
        fd = conn.fileno()
        if fd not in self._held:
            self._epoll.register(fd, _ET)
        self._held[fd] = (conn, time.monotonic() + HAND_OVER_AFTER)

    def _let_go(self, conn: socket.socket) -> None:
        """Stop holding `conn` (before it is closed or handed over)."""
        fd = conn.fileno()
        self._answered_on.discard(fd)
        if self._held.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _serve(self, conn: socket.socket) -> None:
        """Answer a whole status request on `conn`, hand `conn` to the loop, or leave it
        held while its head is not whole yet (and may still be a status request)."""
        try:
            # one byte past MAX_HEAD: whether anything follows a head of MAX_HEAD bytes
            head = conn.recv(MAX_HEAD + 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not head:  # closed: before asking anything, or after an answer
            self._close(conn)
            return
        if not (head.startswith(_STATUS) or _STATUS.startswith(head)):
            self._hand_over(conn)
            return
        end = head.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEAD:
            if len(head) >= MAX_HEAD:
                self._hand_over(conn)
            return
        # Bytes after the head (a pipelined request, a body): the loop's, with the head.
        keep = _status_request(head[:end]) if len(head) == end + 4 else None
        body = None if keep is None else self._status_body(conn)
        if body is None or len(body) > MAX_ANSWER or _queued(conn):
            self._hand_over(conn)
            return
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"" if keep else b"Connection: close\r\n")
        ) + body
        try:
            conn.recv(end + 4)  # the head, whole here; nothing came after it
            sent = conn.send(response)  # into an empty buffer: all of it
        except OSError:
            sent = -1
        if sent != len(response):
            self._close(conn)
            return
        self.answered += 1
        if keep:
            self._hold(conn)  # its next request has its own HAND_OVER_AFTER
            self._answered_on.add(conn.fileno())
        else:
            self._close(conn)

    def _status_body(self, conn: socket.socket) -> bytes | None:
        """The status for this connection's caller; None where the loop must answer: the
        caller cannot be told, or may not ask (the loop's 403 names why)."""
        try:
            caller = peer_caller(conn)
        except OSError:
            return None
        config = self._access()
        if not access.allowed(config, self._euid, caller, "restore"):
            return None
        doc, age = self._board.read()
        if not doc:
            return None
        return answer(self._board, doc, age, caller_part(config, self._euid, caller))

    def _close(self, conn: socket.socket) -> None:
        self._let_go(conn)
        conn.close()

    def _hand_over(self, conn: socket.socket) -> None:
        answered = conn.fileno() in self._answered_on
        self._let_go(conn)
        self.handed += 1
        if not self._post(self._adopt, conn, answered):
            conn.close()

    def _post(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            return False
        return True


def _paused(e: OSError) -> None:
    """Accepting ran out of descriptors (either desk): said once a pause."""
    log.warning("accepting on the socket failed: %s; accepting again in %gs", e, ACCEPT_PAUSE)


def _queued(conn: socket.socket) -> bool:
    """Whether bytes sent on `conn` are still unread by its client (an earlier answer): the
    desk then leaves the connection to the loop, which may wait for the client."""
    out = array.array("i", [0])
    try:
        fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, out)
    except OSError:
        return True
    return out[0] > 0


def _status_request(head: bytes) -> bool | None:
    """For a request head (no blank line): None unless it is a `GET /v1/status` the desk
    answers (strictly formed HTTP/1.x, no body, one Host in HTTP/1.1, no header twice);
    else whether its connection stays open after the answer."""
    lines = head.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    keep = line.group(1) == b"1"  # (an HTTP/1.0 connection closes after the answer)
    seen: set[bytes] = set()
    for raw in lines[1:]:
        header = _HEADER.fullmatch(raw)
        if header is None:
            return None  # malformed, or a bare LF inside: the loop's parser says how
        name, value = header.group(1).lower(), header.group(2).rstrip(b" \t").lower()
        if name in seen:
            return None
        seen.add(name)
        if name == b"content-length" and value != b"0":
            return None
        if name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        if name == b"connection" and b"close" in {t.strip() for t in value.split(b",")}:
            keep = False
    if line.group(1) == b"1" and b"host" not in seen:
        return None  # HTTP/1.1 without Host: aiohttp answers 400
    return keep

"""The socket's front desk: `GET /v1/status` answered off the event loop.

While a restore of 100,000 files runs, the loop's steps are milliseconds long (fill workers,
flights, admissions), and a status request waits its turn: 30-40 ms at p99, against 1 ms
idle. A monitor that asks "is hostd alive, what is it doing" should not wait for the work.

So one thread, the desk, accepts every connection on the socket. It peeks at what came (
MSG_PEEK: nothing is taken from the connection), and:

- a whole `GET /v1/status` head, with no body, from a caller who may ask for it: answered
  here, from the status the loop last rendered (`Board`) and the caller's own part;
- anything else, and a request whose head has not come whole within HAND_OVER_AFTER: handed
  to aiohttp on the loop as it came (`loop.connect_accepted_socket`), which answers it as it
  answers every request, errors (403, 404, 405, timeouts) included.

A connection the desk answered and that asks to stay open goes to aiohttp for what follows.

The status a desk answer carries is at most STALE_AFTER plus the loop's lag old, and says how
old (`status_age`, seconds): the loop renders it at the start and end of every operation (so
`in_flight` and the snapshot count are current for whoever just finished one), and again
when the desk finds it older than STALE_AFTER. The desk asks for that rendering and does not
wait for it: a loop that is stalled shows as a growing `status_age`, not as a status that
never comes. `uptime` is the desk's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from hostd import access
from hostd.caller import Caller, peer_caller
from hostd.config import AccessConfig

log = logging.getLogger(__name__)

HAND_OVER_AFTER = 0.05  # a head not whole by then goes to the loop (a slow client's is)
STALE_AFTER = 0.25  # the desk asks the loop for a fresh rendering past this age
MAX_HEAD = 8192  # a status request's head is a few hundred bytes; longer: the loop's
# A status is a few KiB (a large peer list makes it more). One sent from here must go into
# the socket's buffer whole, without waiting for the client (over 200 KiB on Linux), so a
# longer one is the loop's to send.
MAX_ANSWER = 64 * 1024
ACCEPT_PAUSE = 1.0  # out of descriptors: accept again after this (as asyncio does)
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_STATUS = b"GET /v1/status"


class Board:
    """The daemon's status as the loop last rendered it, read by the desk's thread.

    `render` runs on the loop only (it reads the loop's structures); the desk reads the
    rendering, one tuple replaced whole, from its thread."""

    def __init__(self, render: Callable[[], dict[str, Any]], started: float) -> None:
        self._render = render
        self.started = started  # time.monotonic() at the daemon's start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: tuple[dict[str, Any], float] = ({}, -1.0)
        self._asked = False

    def __repr__(self) -> str:
        return f"Board(age={time.monotonic() - self._current[1]:.3f}s)"

    def refresh(self) -> dict[str, Any]:
        """Render the status now (on the loop) and post it; the rendering."""
        self._loop = asyncio.get_running_loop()
        self._asked = False
        doc = self._render()
        self._current = (doc, time.monotonic())
        return doc

    def read(self) -> tuple[dict[str, Any], float]:
        """The last rendering and its age in seconds (any thread); past STALE_AFTER a fresh
        one is asked of the loop, not waited for."""
        doc, at = self._current
        age = time.monotonic() - at
        if age > STALE_AFTER and not self._asked and self._loop is not None:
            self._asked = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopping
                self._loop.call_soon_threadsafe(self.refresh)
        return doc, age


def answer(board: Board, doc: dict[str, Any], age: float, caller_part: dict[str, Any]) -> bytes:
    """A status body: the rendering, its age, the uptime now, and the caller's part."""
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


class Desk:
    """The thread that accepts the socket's connections (see the module's doc)."""

    def __init__(
        self,
        listener: socket.socket,
        board: Board,
        access_config: Callable[[], AccessConfig],
        euid: int,
        factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self._listener = listener
        self._board = board
        self._access = access_config
        self._euid = euid
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._steps: set[asyncio.Task[Any]] = set()
        self._fallback: asyncio.Server | None = None
        self.answered = 0  # status requests answered here
        self.handed = 0  # connections handed to the loop
        listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="hostd-desk", daemon=True)

    def __repr__(self) -> str:
        return f"Desk(answered={self.answered}, handed={self.handed})"

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Stop accepting; connections neither answered nor handed over yet are closed."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        await asyncio.to_thread(self._thread.join)
        if self._steps:
            await asyncio.wait(self._steps)
        if self._fallback is not None:
            self._fallback.close()
        for s in (self._wake_r, self._wake_w, self._listener):
            s.close()

    # -- the desk's thread ----------------------------------------------------------------

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        waiting: dict[socket.socket, float] = {}  # connection -> when it goes to the loop
        resume = 0.0  # accepting paused until then (out of descriptors)
        try:
            while not self._stopping:
                now = time.monotonic()
                if resume and now >= resume:
                    sel.register(self._listener, selectors.EVENT_READ)
                    resume = 0.0
                wake = [*waiting.values(), resume] if resume else list(waiting.values())
                timeout = max(0.0, min(wake) - now) if wake else None
                for key, _ in sel.select(timeout):
                    conn = key.fileobj
                    if conn is self._wake_r:
                        continue
                    if conn is self._listener:
                        resume = self._accept(sel, waiting)
                        if resume:
                            sel.unregister(self._listener)
                        continue
                    assert isinstance(conn, socket.socket)
                    served = self._serve(conn)
                    if served is None:  # kept open: the next request has its own time
                        waiting[conn] = time.monotonic() + HAND_OVER_AFTER
                    elif served:
                        sel.unregister(conn)
                        del waiting[conn]
                now = time.monotonic()
                for conn in [c for c, until in waiting.items() if until <= now]:
                    sel.unregister(conn)
                    del waiting[conn]
                    self._hand_over(conn)
        except Exception:
            log.exception("the socket's desk failed: the loop answers every request from now")
            for conn in waiting:
                self._hand_over(conn)
            waiting.clear()
            self._post(self._fall_back)
        finally:
            for conn in waiting:
                conn.close()
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, waiting: dict[socket.socket, float]) -> float:
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
                log.warning(
                    "accepting on the socket failed: %s; accepting again in %gs", e, ACCEPT_PAUSE
                )
                return time.monotonic() + ACCEPT_PAUSE
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            waiting[conn] = time.monotonic() + HAND_OVER_AFTER

    def _serve(self, conn: socket.socket) -> bool | None:
        """Answer a whole status request on `conn`, or hand `conn` to the loop. True: done
        with it; False: its head is not whole yet (it may still be a status request); None:
        answered, and it stays open for another request (the loop's if none comes soon)."""
        try:
            head = conn.recv(MAX_HEAD, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            conn.close()
            return True
        if not head:  # closed: before asking anything, or after an answer
            conn.close()
            return True
        if not (head.startswith(_STATUS) or _STATUS.startswith(head)):
            self._hand_over(conn)
            return True
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) >= MAX_HEAD:
                self._hand_over(conn)
                return True
            return False
        keep = _status_request(head[:end])
        body = None if keep is None else self._status_body(conn)
        if body is None or len(body) > MAX_ANSWER:
            self._hand_over(conn)
            return True
        conn.recv(end + 4)  # the head, which is here whole; nothing past it
        response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"" if keep else b"Connection: close\r\n")
        ) + body
        try:
            sent = conn.send(response)  # a few KiB into an empty socket buffer: all of it
        except OSError:
            sent = -1
        self.answered += 1
        if sent == len(response) and keep:
            return None
        conn.close()
        return True

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

    def _hand_over(self, conn: socket.socket) -> None:
        self.handed += 1
        if not self._post(self._adopt, conn):
            conn.close()

    def _post(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            return False
        return True

    # -- on the loop ----------------------------------------------------------------------

    def _adopt(self, conn: socket.socket) -> None:
        """aiohttp serves `conn` from here on."""

        async def adopt() -> None:
            try:
                await self._loop.connect_accepted_socket(self._factory, conn)
            except OSError as e:
                log.warning("handing a connection to the loop failed: %s", e)
                conn.close()

        self._step(adopt())

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


def _status_request(head: bytes) -> bool | None:
    """For a request head (no blank line): None unless it is a `GET /v1/status` the desk can
    answer (HTTP/1.x, no body); else whether its connection stays open after the answer."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method != b"GET" or target.partition(b"?")[0] != b"/v1/status":
        return None
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    keep = version == b"HTTP/1.1"  # (an HTTP/1.0 connection closes after the answer)
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or name != name.strip():
            return None  # malformed: the loop's parser says how
        name, value = name.lower(), value.strip().lower()
        if name == b"content-length" and value != b"0":
            return None
        if name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        if name == b"connection":
            tokens = {t.strip() for t in value.split(b",")}
            if b"close" in tokens:
                keep = False
    return keep

"""HTTP/1.1 for the client side of the local API: one request per Unix socket connection.

client.py's transport, standard library only. http.client would do, but it imports the email
package and ssl (about 40 ms), and a client command must start fast.

The framing is a pure core: `parse_head` reads a response head and `BodyDecoder` unframes a
body (`Transfer-Encoding: chunked`, `Content-Length`, or the connection's end), bytes in and
bytes out, raising `ProtocolError` for what is not HTTP/1.1. `Connection` does the blocking
I/O. Every request says `Connection: close`, so a response ends the connection and nothing
is pooled. This module raises OSError (`ConnectionClosed` among them) and ProtocolError, and
translates neither: client.py is the edge that turns both into HostdError.
"""

from __future__ import annotations

import _socket  # socket.py's C core: its import makes an enum of every constant and pulls in
import _thread  # selectors, ~3 ms of a client command's start for nothing this module uses
import codecs
import contextlib
import os
import select
import signal
import struct
from collections.abc import Iterator

MAX_HEAD = 64 * 1024
"""A response head longer than this is not the daemon's."""
MAX_LINE = 4096
"""Nor is a chunk-size or trailer line longer than this."""
RECV_BYTES = 256 * 1024


def _wakeup_fd() -> int:
    """The read end of a pipe the interpreter writes to when a signal arrives, in the main
    thread (where signals are handled; installed on first use there, where no one else's
    is); -1 in any other thread, or where there is none.

    A blocking recv misses a Ctrl-C that lands between the interpreter's last check for
    signals and the system call: the handler only flags it, and recv waits on for data a
    stalled stream may never send. Waiting on the socket and this pipe together cannot miss
    it: the byte the signal wrote is there however early it came."""
    global _WAKEUP, _MAIN
    me = _thread.get_ident()
    if _WAKEUP is None and me not in _OTHERS:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (an ident, once another's, is never main's)
            os.close(r)
            os.close(w)
            if len(_OTHERS) > 4096:  # (a program of many short threads)
                _OTHERS.clear()
            _OTHERS.add(me)
            return -1
        if old == -1:
            _WAKEUP, _MAIN = r, me
        else:  # someone else's (an event loop's): put it back, wait as before
            signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            _WAKEUP = -1
    return _WAKEUP if _WAKEUP is not None and me == _MAIN else -1


_WAKEUP: int | None = None
_MAIN: int | None = None  # the thread that installed it: the main one
_OTHERS: set[int] = set()  # threads found not to be the main one


def _recv(sock: _socket.socket) -> bytes:
    """sock.recv, interruptible by a signal however early it came (see _wakeup_fd)."""
    fd = _wakeup_fd()
    if fd >= 0:
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        poll.register(fd, select.POLLIN)
        # A signal's handler runs (and Ctrl-C raises) once poll returns: on EINTR, or at once
        # if the signal came before poll started and left its byte in the pipe.
        while not any(f != fd for f, _ in poll.poll()):
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 512)
    return sock.recv(RECV_BYTES)


class ProtocolError(Exception):
    """The daemon's bytes are not an HTTP/1.1 response this module can read."""


class ConnectionClosed(ConnectionError):
    """The daemon closed the connection before its response ended."""


class Head:
    """A response's status line and headers; header names lower-cased, repeats joined by ','."""

    def __init__(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers

    def __repr__(self) -> str:
        return f"<Head {self.status} {self.reason!r} headers={len(self.headers)}>"

    @property
    def media_type(self) -> str:
        """The Content-Type without its parameters, lower-cased (HTTP's default if absent)."""
        value = self.headers.get("content-type", "")
        return value.partition(";")[0].strip().lower() or "application/octet-stream"

    @property
    def charset(self) -> str:
        """The Content-Type's charset parameter, if Python knows it; else utf-8."""
        for param in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                try:
                    return codecs.lookup(value.strip().strip('"')).name
                except LookupError:
                    break
        return "utf-8"


def parse_head(raw: bytes) -> Head:
    """A response head: the bytes before the blank line that ends it."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"not an HTTP header line: {line[:100]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]},{value.strip()}" if key in headers else value.strip()
    return Head(int(code), reason.strip(), headers)


_SIZE, _DATA, _DATA_END, _TRAILER = "size", "data", "data end", "trailer"


class BodyDecoder:
    """Unframes one response body. Pure: feed it what the socket gave, get the body's bytes.

    `done` turns true when the framing says the body is complete; bytes after that are not
    the body's and are dropped (the connection is closing anyway). At the connection's end,
    `end()` raises ConnectionClosed if the body needed more.
    """

    def __init__(self, head: Head, *, method: str = "GET") -> None:
        self._buffer = bytearray()
        self._state = _SIZE
        self._remaining = -1  # -1: until the connection ends
        self._chunked = False
        coding = head.headers.get("transfer-encoding", "").strip().lower()
        length = head.headers.get("content-length")
        if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
            self._remaining = 0
        elif coding == "chunked":  # wins over a Content-Length, as RFC 9112 says
            self._chunked = True
        elif coding:  # a compressed coding: this client never asks for one
            raise ProtocolError(f"unsupported Transfer-Encoding {coding!r}")
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not (value := values.pop()).isdigit():
                raise ProtocolError(f"bad Content-Length {length!r}")
            self._remaining = int(value)
        self.done = not self._chunked and self._remaining == 0

    def __repr__(self) -> str:
        framing = "chunked" if self._chunked else f"remaining={self._remaining}"
        return f"<BodyDecoder {framing} done={self.done}>"

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        if not self._chunked:
            if self._remaining < 0:
                return data
            piece = data[: self._remaining]
            self._remaining -= len(piece)
            self.done = self._remaining == 0
            return piece
        self._buffer += data
        out = bytearray()
        while not self.done:
            if self._state == _DATA:
                if not self._buffer:
                    break
                take = min(len(self._buffer), self._remaining)
                out += self._buffer[:take]
                del self._buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            line = self._line()
            if line is None:
                break
            self._chunk_line(line)
        return bytes(out)

    def end(self) -> None:
        """The connection ended: fine if the body is complete or runs to the end."""
        if not self.done and (self._chunked or self._remaining > 0):
            raise ConnectionClosed("the daemon closed the connection before the body ended")
        self.done = True

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError(f"a chunked-encoding line longer than {MAX_LINE} bytes")
            return None
        line = bytes(self._buffer[:end]).removesuffix(b"\r")
        del self._buffer[: end + 1]
        return line

    def _chunk_line(self, line: bytes) -> None:
        if self._state == _DATA_END:
            if line:
                raise ProtocolError(f"chunk data longer than its size: {line[:100]!r}")
            self._state = _SIZE
        elif self._state == _TRAILER:
            self.done = not line  # trailer fields are read past: the API sends none
        else:
            size = line.partition(b";")[0].strip()  # chunk extensions are ignored
            try:
                self._remaining = int(size, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {line[:100]!r}") from None
            if self._remaining < 0 or size.startswith((b"-", b"+", b"0x", b"0X")):
                raise ProtocolError(f"bad chunk size {line[:100]!r}")
            self._state = _DATA if self._remaining else _TRAILER


class Connection:
    """One request and its response over a Unix stream socket, with blocking I/O.

    `connect_timeout` bounds the connect only: once connected, a stream may run for hours.
    The thread that uses the connection closes it; `abort()` may come from any thread.
    """

    def __init__(self, path: str, *, connect_timeout: float) -> None:
        self.path = path
        self._connect_timeout = connect_timeout
        self._sock: _socket.socket | None = None
        self._aborted = False

    def __repr__(self) -> str:
        state = "aborted" if self._aborted else "open" if self._sock is not None else "closed"
        return f"<Connection {self.path!r} {state}>"

    def connect(self) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout says
            # A blocking socket with a send timeout, not settimeout(): a Unix socket's connect
            # waits for room in a full listen backlog only when blocking, for SO_SNDTIMEO.
            seconds, fraction = divmod(self._connect_timeout, 1)
            timeout = struct.pack("ll", int(seconds), int(fraction * 1_000_000))
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, timeout)
            try:
                sock.connect(self.path)
            except BlockingIOError as exc:  # EAGAIN: the backlog stayed full
                raise TimeoutError(f"timed out after {self._connect_timeout:g}s") from exc
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        if self._aborted:  # aborted from another thread while connecting
            self.abort()

    def request(
        self, method: str, target: str, body: bytes | None = None, content_type: str = ""
    ) -> Response:
        """Send a request and read the response's head; the body is the Response's to read."""
        sock = self._connected()
        lines = [f"{method} {target} HTTP/1.1", "Host: hostd", "Connection: close"]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
            if content_type:
                lines.append(f"Content-Type: {content_type}")
        sock.sendall("\r\n".join([*lines, "", ""]).encode("latin-1") + (body or b""))
        buffered = bytearray()
        while (end := buffered.find(b"\r\n\r\n")) < 0:
            if len(buffered) > MAX_HEAD:
                raise ProtocolError(f"a response head longer than {MAX_HEAD} bytes")
            data = _recv(sock)
            if not data:
                raise ConnectionClosed("the daemon closed the connection without an answer")
            buffered += data
        head = parse_head(bytes(buffered[:end]))
        return Response(self, head, BodyDecoder(head, method=method), bytes(buffered[end + 4 :]))

    def recv(self) -> bytes:
        return _recv(self._connected())

    def abort(self) -> None:
        """Cut the connection, from any thread: a recv blocked on it returns, and the daemon
        sees its client go (and cancels a stream). The socket stays open until close()."""
        self._aborted = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # not connected, or already gone
                sock.shutdown(_socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close our side for writing, from any thread: the daemon sees its client go (and
        cancels a stream), and what it sent before that can still be read."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):  # not connected, or already gone
                sock.shutdown(_socket.SHUT_WR)

    def close(self) -> None:
        """Close the socket. Only the thread that uses the connection may: a socket closed
        under another thread's recv could have its descriptor reused before the recv runs."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _connected(self) -> _socket.socket:
        if self._sock is None:
            raise ConnectionClosed("the connection is closed")
        return self._sock


class Response:
    """A response whose head has arrived; its body is read on demand, once."""

    def __init__(self, conn: Connection, head: Head, decoder: BodyDecoder, early: bytes) -> None:
        self.head = head
        self._conn = conn
        self._decoder = decoder
        self._early = early  # body bytes that came with the head

    def __repr__(self) -> str:
        return f"<Response {self.head.status} {self._decoder!r}>"

    @property
    def status(self) -> int:
        return self.head.status

    def body(self) -> Iterator[bytes]:
        """The body's bytes as they arrive; ConnectionClosed if the connection ends first."""
        data, self._early = self._early, b""
        while not self._decoder.done:
            if data:
                piece = self._decoder.feed(data)
                if piece:
                    yield piece
            if self._decoder.done:
                break
            data = self._conn.recv()
            if not data:
                self._decoder.end()

    def read(self, limit: int) -> bytes:
        """The body, or its first `limit` bytes: reading stops there."""
        data = bytearray()
        for piece in self.body():
            data += piece
            if len(data) >= limit:
                break
        return bytes(data[:limit])

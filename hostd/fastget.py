"""Capped, zero-copy GETs of chunk and pack objects: the hot path of a cold restore.

obstore hands a streamed body to Python as new `bytes`, one copy per piece (with the memset
and the fresh pages of each: ~7% of the daemon's CPU in a cold restore, in a thread that
holds the GIL). Its zero-copy whole-body read cannot be used instead: a server that sends
both Content-Length and chunked encoding gets any amount buffered for the size it stated,
and an origin read must stay capped. So the chunk and pack GETs come here first: the URL
obstore signs for the object (S3, GCS, Azure), or the object's plain URL on an http(s)
origin, one HTTP/1.1 request on a pooled keep-alive connection, and the body received
straight into a buffer of exactly its stated size (socket.recv_into: the kernel's copy,
nothing else), once the stated size has passed the cap. The socket work runs on threads of
its own, blocking, with the GIL released in every send and receive (on the event loop, a
receive holds the GIL for its copy and stalls the threads that hash and write).

Only the plain answer is taken here: 200 (206 with exactly the range asked for) with a
Content-Length and no Transfer-Encoding, in a head of at most MAX_HEAD bytes. Anything else
(another status, a redirect, chunked encoding, a connection that fails or closes early, a
byte past the stated length in the same read) returns None, and the caller asks obstore
the usual way, so every error, retry and status is obstore's as before. A stated size over
the cap raises Oversized before any body byte is read. A pooled connection with anything to
read before its next request (bytes past the last answer, an EOF) is dropped, never read
for that answer. After OFF_AFTER fallbacks in a row this path is off for OFF_FOR seconds (a
server it cannot talk to costs a failed try per request only that often).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import obstore
from obstore.store import AzureStore, GCSStore, HTTPStore, ObjectStore, S3Store

from hostd.errors import unheard

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_HEAD = 64 * 1024  # a response head larger than this is not a plain answer
_HEAD_END = re.compile(rb"\r?\n\r?\n")  # lines end in CRLF, or a bare LF (RFC 9112 2.2)
IDLE_PER_HOST = 32  # keep-alive connections kept per host
OFF_AFTER = 3  # fallbacks in a row that turn the path off ...
OFF_FOR = 60.0  # ... for this long
SIGNED_FOR = timedelta(minutes=15)  # a signed URL is used at once; the clock may be off
# Client options under which obstore's requests and these are alike (anything else, a
# proxy, other certificates, HTTP/2 only, and obstore alone talks to the origin).
PLAIN_OPTIONS = frozenset({"timeout", "read_timeout", "connect_timeout", "allow_http"})
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
# Store settings that put headers on every GET (a requester-pays bucket, customer-provided
# encryption keys): a signed URL alone would be refused, so obstore does those reads.
HEADER_SETTINGS = ("request_payer", "sse_customer", "sse_c_")
DISABLE = "HOSTD_FAST_GET"  # "0" in the environment: obstore for every read


class Oversized(Exception):
    """The object's stated size is over the cap: refused before its body was read."""

    def __init__(self, stated: int) -> None:
        super().__init__(f"is {stated} bytes")
        self.stated = stated


class Whole(Exception):
    """A ranged GET answered 200 with the whole object: the server answers no ranges (not
    a fault of this path, so not counted against it)."""


class _Fallback(Exception):
    """Not a plain answer: the caller asks obstore."""


def for_store(
    store: ObjectStore,
    url: str,
    client: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    threads: int = 16,
    config: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> FastGet | None:
    """The fast path for an origin's store, or None where obstore must do every read: a
    local store, client options beyond PLAIN_OPTIONS, store `config` in HEADER_SETTINGS (or
    such AWS_ variables), a proxy in the environment, or HOSTD_FAST_GET=0. `threads`:
    requests at once (the origin's own limit); `timeout`, FastGet's."""
    if environ.get(DISABLE) == "0":
        return None
    if set(client) - PLAIN_OPTIONS:
        return None
    names = [k.lower() for k in (config or {})]
    names += [k.lower() for k in environ if k.startswith("AWS_")]
    if any(h in n for n in names for h in HEADER_SETTINGS):
        return None
    if any(environ.get(v) or environ.get(v.upper()) for v in PROXY_VARIABLES):
        return None
    if isinstance(store, HTTPStore):
        return FastGet(_plain_urls(url), threads=threads, timeout=timeout)
    if isinstance(store, S3Store | GCSStore | AzureStore):
        signing = store

        def signed(key: str) -> str:
            got: str = obstore.sign(signing, "GET", key, SIGNED_FOR)
            return got

        return FastGet(signed, threads=threads, timeout=timeout)
    return None


def _plain_urls(url: str) -> Callable[[str], str]:
    """An http(s) origin's object URLs, as obstore's HTTPStore makes them: the key joined
    onto the base's path, percent-encoded (a path of any characters stays one), and the
    base's query, if any, after it."""
    base = urlsplit(url)
    path = quote(base.path.rstrip("/"), safe="/%!$&'()*+,;=:@~-._")
    query = f"?{base.query}" if base.query else ""
    prefix = f"{base.scheme}://{base.netloc}{path}"

    def plain(key: str) -> str:
        return f"{prefix}/{quote(key)}{query}"

    return plain


class FastGet:
    """GETs of one origin's objects, on pooled connections; see the module's doc."""

    def __init__(
        self, url_of: Callable[[str], str], *, threads: int, timeout: float = 60.0
    ) -> None:
        """`url_of(key)`: the URL to GET (blocking; called on the request's thread).
        `threads`: requests at once. `timeout`: how long a connect, a handshake, or a wait
        for any byte of the answer may take: then this path gives up (a miss, towards
        OFF_AFTER) and obstore is asked. Set it within the caller's own deadline, whose
        cancel is no miss: a server this path cannot talk to that never answers it would
        otherwise cost every request its whole deadline, for good."""
        self._url_of = url_of
        self._timeout = timeout
        self._idle: dict[tuple[str, int, bool], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._threads = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="hostd-fastget"
        )
        self._closed = False
        self._aborts: weakref.WeakSet[_Abort] = weakref.WeakSet()  # requests under way
        self._misses = 0
        self._off_until = 0.0
        self.taken = 0  # answers taken here
        self.fallbacks = 0  # requests handed back to obstore

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"FastGet(taken={self.taken}, fallbacks={self.fallbacks}, idle={idle})"

    async def get(
        self, key: str, cap: int, span: tuple[int, int] | None = None
    ) -> memoryview | None:
        """The object's body (`span`: its `length` bytes from `offset`, as a 206), or None:
        ask obstore. Oversized if the stated size is over `cap` (a span's own length must
        fit it too); Whole if a span was answered with the whole object."""
        if not self.on:
            return None
        abort = self.new_abort()
        try:
            loop = asyncio.get_running_loop()
            try:
                job = loop.run_in_executor(self._threads, self._fetch, key, cap, span, abort)
            except RuntimeError:  # the pool is shut down: closed
                return None
            try:
                data = await asyncio.shield(job)
            except asyncio.CancelledError:
                abort.now()  # the thread's receive returns at once; its socket is dropped
                job.add_done_callback(unheard)  # (its end is nobody's news)
                raise
        except _Fallback as e:
            self._missed(e)
            return None
        self._took()
        return data

    def _fetch(self, key: str, cap: int, span: tuple[int, int] | None, abort: _Abort) -> memoryview:
        """One request and its answer (blocking, signing included: a thread's work, not the
        loop's)."""
        sock, where, length, keep, early = self._open(key, cap, span, abort)
        try:
            body = bytearray(length)
            body[: len(early)] = early
            view = memoryview(body)
            _receive(sock, view[len(early) :])
        except BaseException:
            sock.close()
            raise
        finally:
            abort.hold(None)
        if keep:
            self._give(where, sock)
        else:
            sock.close()
        return view

    def _open(
        self, key: str, cap: int, span: tuple[int, int] | None, abort: _Abort
    ) -> tuple[socket.socket, tuple[str, int, bool], int, bool, memoryview]:
        """Send the GET of `key` and receive its answer's head (blocking): the connection,
        held by `abort`, where it goes back to, the body's length, whether the connection may
        carry another request, and the body's first bytes. A pooled connection that turns
        out closed before any byte of its answer is dropped for the next one, then a fresh
        one (a server drops idle ones at will)."""
        where, request = self._request(key, span)
        while True:
            sock = self._take(where)
            fresh = sock is None
            if sock is None:
                sock = self._connect(where, abort)
            if not abort.hold(sock):
                sock.close()
                raise _Fallback("cancelled")
            try:
                sock.settimeout(self._timeout)  # (_ssl retries a blocking want-read for ever)
                length, keep, early = _head(sock, request, cap, span)
                sock.settimeout(None)  # the body: one MSG_WAITALL receive, SO_RCVTIMEO its limit
            except _Stale as e:
                abort.hold(None)
                sock.close()
                if fresh:
                    raise _Fallback(str(e)) from None
                continue
            except BaseException:
                abort.hold(None)
                sock.close()
                raise
            return sock, where, length, keep, early

    def stream(self, key: str, offset: int, length: int) -> Stream:
        """A ranged GET of `length` bytes at `offset` of `key`, to be received a piece at a
        time (Stream.open, then Stream.read)."""
        return Stream(self, key, (offset, length), length)

    def whole(self, key: str, cap: int) -> Stream:
        """A GET of all of `key`, at most `cap` bytes (Oversized if it states more), to be
        received a piece at a time: a pack from a server that answers no ranges."""
        return Stream(self, key, None, cap)

    def _missed(self, why: _Fallback) -> None:
        self.fallbacks += 1
        self._misses += 1
        if self._misses >= OFF_AFTER:
            self._off_until = time.monotonic() + OFF_FOR
            self._misses = 0
            log.info("origin reads go through obstore for %.0fs: %s", OFF_FOR, why)

    def _took(self) -> None:
        self.taken += 1
        self._misses = 0

    @property
    def on(self) -> bool:
        """False while fallbacks have turned this path off (OFF_FOR)."""
        return time.monotonic() >= self._off_until

    def _request(
        self, key: str, span: tuple[int, int] | None
    ) -> tuple[tuple[str, int, bool], bytes]:
        """Where to send the GET of `key`, and its bytes."""
        try:
            url = urlsplit(self._url_of(key))
        except Exception as e:  # signing failed (credentials): obstore says how
            raise _Fallback(f"no URL for {key}: {e}") from None
        tls = url.scheme == "https"
        host = url.hostname
        if url.scheme not in ("http", "https") or host is None:
            raise _Fallback(f"not an http(s) URL: {url.scheme}")
        port = url.port or (443 if tls else 80)
        target = f"{url.path}?{url.query}" if url.query else url.path
        netloc = url.netloc.rpartition("@")[2]  # (userinfo is not sent: obstore's job)
        head = f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: hostd\r\n"
        if span is not None:
            head += f"Range: bytes={span[0]}-{span[0] + span[1] - 1}\r\n"
        try:
            return (host, port, tls), (head + "\r\n").encode("ascii")
        except UnicodeEncodeError:  # a name that must be encoded first (IDNA): obstore's
            raise _Fallback(f"not an ASCII request: {netloc!r}") from None

    def _take(self, where: tuple[str, int, bool]) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(where)
            while idle:
                sock = idle.pop()
                if not _readable(sock):  # open, and nothing waiting on it
                    return sock
                sock.close()
        return None

    def _give(self, where: tuple[str, int, bool], sock: socket.socket) -> None:
        with self._lock:
            if self._closed:
                sock.close()
                return
            idle = self._idle.setdefault(where, [])
            if len(idle) < IDLE_PER_HOST:
                idle.append(sock)
                return
        sock.close()

    def _connect(self, where: tuple[str, int, bool], abort: _Abort) -> socket.socket:
        """A new connection (blocking). Its socket is held by `abort` while it connects, so
        a cancel (or close) ends a connect to an origin that drops SYNs at once: a shutdown
        wakes a blocked connect. Without that, the thread would wait out the timeout."""
        host, port, tls = where
        try:
            sock = self._dial(host, port, abort)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Blocking from here, so a body is one MSG_WAITALL receive (one release of the
            # GIL, not one per segment); the kernel's own timeouts are the backstop.
            sock.settimeout(None)
            whole, part = divmod(self._timeout, 1.0)
            backstop = struct.pack("ll", int(whole), max(int(part * 1e6), 0 if whole else 1))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, backstop)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, backstop)
            if tls:
                sock = self._handshake(sock, host, abort)
        except OSError as e:
            raise _Fallback(f"connecting to {host}:{port}: {e}") from None
        return sock

    def _handshake(self, sock: socket.socket, host: str, abort: _Abort) -> ssl.SSLSocket:
        """TLS over a new connection, held by `abort` while it shakes hands (the wrapped
        socket: wrapping takes the plain one's descriptor away) and within the timeout: a
        server that never answers the hello would hold the thread for good (_ssl retries a
        blocking socket's want-read for ever, whatever SO_RCVTIMEO says)."""
        with self._lock:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        sock.settimeout(self._timeout)
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            if not abort.hold(tls):
                raise _Fallback("cancelled")
            tls.do_handshake()
            tls.settimeout(None)
        except BaseException:
            tls.close()
            raise
        return tls

    def _dial(self, host: str, port: int, abort: _Abort) -> socket.socket:
        """socket.create_connection, each try's socket held by `abort`."""
        last: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            if not abort.hold(sock):
                sock.close()
                raise _Fallback("cancelled")
            try:
                sock.settimeout(self._timeout)
                sock.connect(address)
                return sock
            except OSError as e:
                abort.hold(None)
                sock.close()
                last = e
        raise last if last is not None else OSError(f"no address for {host}")

    def new_abort(self) -> _Abort:
        """An abort for one request, which close() also sets off."""
        abort = _Abort()
        with self._lock:
            if self._closed:
                abort.now()
            else:
                self._aborts.add(abort)
        return abort

    def close(self) -> None:
        """Drop the idle connections, and end every request under way (its thread's
        connect or receive returns at once)."""
        with self._lock:
            self._closed = True
            aborts = list(self._aborts)
            self._aborts.clear()
        for abort in aborts:
            abort.now()
        with self._lock:
            for socks in self._idle.values():
                for sock in socks:
                    sock.close()
            self._idle.clear()
        self._threads.shutdown(wait=False)


class Broken(Exception):
    """A stream's connection failed after its answer was taken: the bytes not yet read
    must be asked for again (obstore's retries are not behind this path)."""


class Stream:
    """A ranged GET (or, with no `span`, a whole object's of at most `cap` bytes) whose
    body is received a piece at a time, each piece into a buffer of its own and handed, on
    the receiving thread, to the caller's `then` (a pack run's chunks: each verified as it
    lands, and no more of the body held than the piece being read). The connection is held
    between pieces, and goes back to the pool once the whole body is read. Not for two
    reads at once."""

    def __init__(self, fast: FastGet, key: str, span: tuple[int, int] | None, cap: int) -> None:
        self._fast = fast
        self._key = key
        self._span = span
        self._cap = cap
        self._abort = fast.new_abort()
        self._sock: socket.socket | None = None
        self._where: tuple[str, int, bool] | None = None
        self._keep = False
        self._early = memoryview(b"")  # body bytes that came with the head
        self.left = cap  # body bytes not read yet (once open: of the stated length)
        self._busy: asyncio.Future[Any] | None = None  # a thread's job on the socket

    def __repr__(self) -> str:
        return f"Stream({self._key}, {self._span}, left={self.left})"

    async def open(self) -> bool:
        """Send the request and take the answer's head: False if it is not a plain answer
        (then ask obstore); Oversized if it states more than the range."""
        if not self._fast.on:
            return False
        try:
            opened = await self._run(self._opening)
        except _Fallback as e:
            self._fast._missed(e)
            return False
        self._sock, self._where, self.left, self._keep, self._early = opened
        self._fast._took()
        return True

    async def read(self, n: int, then: Callable[[memoryview], T]) -> T:
        """The range's next `n` bytes, received into a buffer of their own and passed to
        `then` on the receiving thread; its result. Broken if the connection fails: the
        stream is done, and those bytes were not read."""
        if n > self.left:
            raise ValueError(f"{n} bytes asked of a stream with {self.left} left")
        if self._sock is None:
            raise Broken("the stream is closed")
        try:
            got: T = await self._run(self._piece, self._sock, n, then)
        except _Fallback as e:
            self._drop()
            raise Broken(str(e)) from None
        return got

    def _opening(self) -> tuple[socket.socket, tuple[str, int, bool], int, bool, memoryview]:
        """FastGet._open, on the thread; a connection opened for a stream dropped meanwhile
        is closed here, not left to the loop (which may be gone by then)."""
        opened = self._fast._open(self._key, self._cap, self._span, self._abort)
        if not self._abort.let_go():
            opened[0].close()
            raise _Fallback("cancelled")
        return opened

    def _piece(self, sock: socket.socket, n: int, then: Callable[[memoryview], T]) -> T:
        buf = memoryview(bytearray(n))
        early = len(self._early)
        k = min(early, n)
        buf[:k] = self._early[:k]
        self._early = self._early[k:]
        if not self._abort.hold(sock):  # dropped before its turn: closed here (_opening)
            sock.close()
            raise _Fallback("cancelled")
        try:
            _receive(sock, buf[k:])
        finally:
            if not self._abort.let_go():  # dropped meanwhile: closed here too
                sock.close()
        self.left -= n
        return then(buf)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            job = asyncio.get_running_loop().run_in_executor(self._fast._threads, fn, *args)
        except RuntimeError:  # the pool is shut down: the origin was closed
            self._drop()
            raise Broken("the origin is closed") from None
        self._busy = job
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            self._abort.now()  # the thread's receive returns at once
            self._drop()
            raise
        finally:
            self._busy = None

    def close(self) -> None:
        """Give the connection back if the whole range was read; else drop it."""
        if self.left == 0 and self._keep and self._sock is not None and self._where is not None:
            self._fast._give(self._where, self._sock)
            self._sock = None
        else:
            self._drop()

    def _drop(self) -> None:
        """Close the connection: now, or once the thread that uses it is done with it."""
        sock, self._sock = self._sock, None
        self._abort.now()
        busy = self._busy
        if busy is None:
            if sock is not None:
                sock.close()
            return

        def closing(job: asyncio.Future[Any]) -> None:
            if sock is not None:
                sock.close()
            if not job.cancelled() and job.exception() is None:
                got = job.result()
                if isinstance(got, tuple) and isinstance(got[0], socket.socket):
                    got[0].close()  # an open that finished after its caller left

        if busy.done():
            closing(busy)  # (an open that finished as its caller left: its socket too)
        else:
            busy.add_done_callback(closing)


class _Stale(Exception):
    """The connection closed before any byte of the answer."""


class _Abort:
    """A request's socket while a thread uses it, for a cancel to shut it down from the
    loop's thread (its blocked receive then returns)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._done = False

    def hold(self, sock: socket.socket | None) -> bool:
        """Hold `sock` (None: let go); False if the request was cancelled already."""
        with self._lock:
            self._sock = sock
            return not self._done

    def let_go(self) -> bool:
        """Let go of the socket held; False if the request was cancelled meanwhile (the
        thread that used the socket then closes it)."""
        return self.hold(None)

    def now(self) -> None:
        with self._lock:
            self._done = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)


def _readable(sock: socket.socket) -> bool:
    """Whether anything waits to be read: bytes (TLS ones already decrypted included) or
    an EOF."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


def _head(
    sock: socket.socket, request: bytes, cap: int, span: tuple[int, int] | None
) -> tuple[int, bool, memoryview]:
    """Send `request` and receive a plain answer's head: the body's length, whether the
    connection may carry another, and the body's first bytes that came with the head
    (blocking)."""
    scratch = bytearray(MAX_HEAD)
    n = 0
    try:
        sock.sendall(request)
        while True:
            k = sock.recv_into(memoryview(scratch)[n:])
            if k == 0:
                raise _Stale("closed before the answer") if n == 0 else _Fallback("closed")
            seen = max(0, n - 3)  # (a head in many small pieces is not searched anew each)
            n += k
            found = _HEAD_END.search(scratch, seen, n)
            if found is not None:
                end, start = found.span()
                break
            if n >= MAX_HEAD:
                raise _Fallback(f"a response head over {MAX_HEAD} bytes")
    except TimeoutError:
        raise _Fallback(f"no answer within {sock.gettimeout()}s") from None
    except OSError as e:
        if n == 0:
            raise _Stale(f"before the answer: {e}") from None
        raise _Fallback(f"receiving the head: {e}") from None
    length, keep = _parse(bytes(scratch[:end]), cap, span)
    if n - start > length:
        raise _Fallback("more bytes than the stated length")
    return length, keep, memoryview(scratch)[start:n]


def _receive(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`: in one receive where it can be (TLS reads a record at a
    time); _Fallback if the connection fails or closes first (blocking)."""
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = 0
    try:
        while got < len(view):
            k = sock.recv_into(view[got:], len(view) - got, flags)
            if k == 0:
                raise _Fallback("closed mid-body")
            got += k
    except OSError as e:
        raise _Fallback(f"receiving the body: {e}") from None


def _parse(head: bytes, cap: int, span: tuple[int, int] | None) -> tuple[int, bool]:
    """The body's length from a plain answer's head, and whether the connection stays
    open; _Fallback for any other answer, Oversized for a stated size over `cap`."""
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]  # (a bare LF too)
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _Fallback(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = parts[1]
    if span is not None and status == b"200":
        raise Whole()
    if status != (b"206" if span is not None else b"200"):
        raise _Fallback(f"status {status.decode(errors='replace')}")
    keep = parts[0] == b"HTTP/1.1"
    lengths: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _Fallback("a malformed header line")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            raise _Fallback("transfer-encoding")
        elif name == b"connection" and value.lower() == b"close":
            keep = False
        elif name == b"content-encoding" and value.lower() != b"identity":
            # (nobody asked for it): obstore reads it, and the bytes fail their check
            raise _Fallback(f"content-encoding {value.decode(errors='replace')}")
        elif name == b"content-type" and value.lower().startswith(b"multipart/"):
            raise _Fallback("a multipart answer")  # (several ranges: not the one asked)
        elif name == b"content-range" and span is not None:
            offset, length = span
            if not value.startswith(f"bytes {offset}-{offset + length - 1}/".encode()):
                raise _Fallback("a content-range other than the one asked for")
    if len(set(lengths)) != 1 or not lengths[0].isdigit():
        raise _Fallback("no single, numeric Content-Length")
    length = int(lengths[0])
    if span is not None and length != span[1]:
        raise _Fallback("a range of another length")
    if length > cap:
        raise Oversized(length)
    return length, keep

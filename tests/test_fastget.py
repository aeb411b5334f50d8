"""Chunk and pack reads through hostd.fastget: capped, received straight into their buffer,
on pooled keep-alive connections, and handed back to obstore for anything but the plain
answer, so what a restore gets (bytes, errors, caps) is what obstore's path gives.

Against the moto S3 server (signed URLs) and a raw HTTP server in the test's loop that
answers as told: plainly, with both Content-Length and chunked encoding (the answer obstore's
zero-copy read would buffer whole), with a size over the cap and a stalled body, with bytes
past the stated length, with a 404, ignoring a range, and closing idle connections."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from s3server import S3Bucket

from hostd import fastget
from hostd.core import codec
from hostd.core.ids import chunk_id
from hostd.core.retry import RetryPolicy
from hostd.errors import ChunkCorrupt, ChunkMissing, OriginError
from hostd.origin import Origin

FAST = RetryPolicy(attempts=2, base=0.0, cap=0.0)
DATA = os.urandom(300_000)
CID = chunk_id(DATA)
KEY = f"chunks/{CID.hex()[:2]}/{CID.hex()}"

Answer = Callable[[str, dict[str, str]], Awaitable[bytes]]


@dataclass
class Server:
    """A raw HTTP/1.1 server: `answer(path, headers)` gives the bytes to send back for each
    request; `close_idle` closes each connection after its first answer (as a server whose
    keep-alive ran out between two requests)."""

    answer: Answer
    close_idle: bool = False
    connections: int = 0
    requests: list[str] = field(default_factory=list)
    port: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        me = asyncio.current_task()
        assert me is not None
        self.handlers.add(me)
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode().split("\r\n")
                path = lines[0].split()[1]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                self.requests.append(path)
                writer.write(await self.answer(path, headers))
                await writer.drain()
                if self.close_idle:
                    return
        finally:
            try:
                writer.close()
                await writer.wait_closed()  # (a TLS close waits for its shutdown)
            except BaseException as e:
                writer.transport.abort()  # stopped meanwhile: closed now, not left to GC
                if not isinstance(e, Exception):
                    raise
            finally:
                self.handlers.discard(me)  # (so stop() waits for its close too)
                self.writers.discard(writer)

    async def stop(self) -> None:
        """End the connections still open (a client's idle keep-alive one, which obstore
        drops in its own time): on Python 3.11 Server.wait_closed does not wait for them,
        and a handler the loop's end cancels leaves its transport to the collector. Each is
        aborted, so its handler's read ends and it returns: a handler task cancelled instead
        makes 3.11's start_server log its CancelledError ("Exception in callback")."""
        for writer in list(self.writers):
            writer.transport.abort()
        if self.handlers:  # one still waiting on its answer is cancelled after all
            _, stuck = await asyncio.wait(set(self.handlers), timeout=10)
            for task in stuck:
                task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)


class Accepting(socket.socket):
    """A listening socket that keeps what it accepted (asyncio accepts through it)."""

    accepted: list[socket.socket]

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        self.__dict__.setdefault("accepted", []).append(conn)
        return conn, addr


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Server], Awaitable[Origin]]]:
    servers: list[asyncio.Server] = []
    origins: list[Origin] = []
    handlers: list[Server] = []

    async def start(s: Server) -> Origin:
        srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        servers.append(srv)
        handlers.append(s)
        s.port = srv.sockets[0].getsockname()[1]
        o = Origin(f"http://127.0.0.1:{s.port}/o", {}, retry=FAST)
        origins.append(o)
        return o

    yield start
    for o in origins:
        await o.close()
    for srv in servers:
        srv.close()
        await srv.wait_closed()
    for s in handlers:
        await s.stop()


def plain(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def serves(data: bytes) -> Answer:
    async def answer(path: str, headers: dict[str, str]) -> bytes:
        rng = headers.get("range")
        if rng is None:
            return plain(data)
        a, b = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        crange = f"Content-Range: bytes {a}-{b}/{len(data)}\r\n"
        return plain(data[a : b + 1], "206 Partial Content", crange)

    return answer


def fast_of(o: Origin) -> fastget.FastGet:
    f = o._fast
    assert f is not None
    return f


async def test_chunks_come_through_the_fast_path_on_one_connection(serve: Any) -> None:
    s = Server(await serves(DATA))
    o = await serve(s)
    for _ in range(5):
        got = await o.get_chunk(CID, codec.max_stored_size(len(DATA)))
        assert bytes(got) == DATA
    f = fast_of(o)
    assert (f.taken, f.fallbacks) == (5, 0)
    assert s.connections == 1  # kept alive
    assert s.requests == [f"/o/{KEY}"] * 5


async def test_a_pack_range_is_one_ranged_get(serve: Any) -> None:
    s = Server(await serves(DATA))
    o = await serve(s)
    pack = CID
    got = await o.get_pack_range(pack, 1000, 5000, len(DATA))
    assert bytes(got) == DATA[1000:6000]
    assert fast_of(o).taken == 1


async def test_a_closed_idle_connection_is_replaced_not_fallen_back(serve: Any) -> None:
    s = Server(await serves(DATA), close_idle=True)
    o = await serve(s)
    for _ in range(3):
        assert bytes(await o.get_chunk(CID, len(DATA))) == DATA
    f = fast_of(o)
    assert (f.taken, f.fallbacks) == (3, 0)
    assert s.connections == 3


async def test_content_length_with_chunked_encoding_is_left_to_the_capped_stream(
    serve: Any,
) -> None:
    """The answer that would make a zero-copy read buffer 8 MiB for a stated 10 bytes: the
    fast path hands it back, and obstore's capped stream stops it at the cap."""
    piece = b"x" * (1 << 20)

    async def lying(path: str, headers: dict[str, str]) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(8))
        return head + body + b"0\r\n\r\n"

    o = await serve(Server(lying))
    cap = codec.max_stored_size(len(DATA))
    with pytest.raises(ChunkCorrupt, match=f"sent more than {cap} bytes"):
        await o.get_chunk(CID, cap)
    assert fast_of(o).taken == 0
    assert fast_of(o).fallbacks >= 1


async def test_a_stated_size_over_the_cap_is_refused_before_its_body(serve: Any) -> None:
    stalled = asyncio.Event()

    async def huge(path: str, headers: dict[str, str]) -> bytes:
        stalled.set()
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n" + b"x" * 1000

    o = await serve(Server(huge))
    async with asyncio.timeout(10):  # no body byte past the head is waited for
        with pytest.raises(ChunkCorrupt, match="is 1073741824 bytes, over its cap of 400000"):
            await o.get_chunk(CID, 400_000)
    assert stalled.is_set()


async def test_bytes_past_the_stated_length_are_not_trusted(serve: Any) -> None:
    async def extra(path: str, headers: dict[str, str]) -> bytes:
        return plain(DATA) + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"

    s = Server(extra)
    o = await serve(s)
    # The answer is its stated length; what follows it, nobody asked for: the connection
    # is dropped, never read for the next answer.
    for _ in range(2):
        assert bytes(await o.get_chunk(CID, len(DATA))) == DATA
    assert s.connections == 2


async def test_other_answers_go_to_obstore_and_keep_their_meaning(serve: Any) -> None:
    async def missing(path: str, headers: dict[str, str]) -> bytes:
        return plain(b"no such key", "404 Not Found")

    o = await serve(Server(missing))
    with pytest.raises(ChunkMissing):
        await o.get_chunk(CID, len(DATA))


async def test_a_server_that_ignores_ranges_still_answers_through_obstore(serve: Any) -> None:
    async def whole(path: str, headers: dict[str, str]) -> bytes:
        return plain(DATA)  # 200 and the whole object, whatever the Range

    o = await serve(Server(whole))
    got = await o.get_pack_range(CID, 1000, 5000, len(DATA))
    assert bytes(got) == DATA[1000:6000]
    # the range was answered whole: the server answers no ranges, which is no fault of
    # this path (not a fallback); then the whole pack was read here, a piece at a time
    assert (fast_of(o).fallbacks, fast_of(o).taken) == (0, 1)
    assert fast_of(o).on
    assert o.ignores_ranges


async def test_the_path_turns_off_after_fallbacks_in_a_row(serve: Any) -> None:
    async def chunked(path: str, headers: dict[str, str]) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(
            DATA
        ) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(DATA), DATA)

    s = Server(chunked)
    o = await serve(s)
    for _ in range(fastget.OFF_AFTER + 3):
        assert bytes(await o.get_chunk(CID, codec.max_stored_size(len(DATA)))) == DATA
    # the fast path asked OFF_AFTER times, then obstore alone
    assert fast_of(o).fallbacks == fastget.OFF_AFTER
    assert len(s.requests) == 2 * fastget.OFF_AFTER + 3


async def test_s3_reads_are_signed_urls_through_the_fast_path(s3_server: S3Bucket) -> None:
    o = Origin(s3_server.url("pre"), s3_server.options, retry=FAST)
    try:
        await asyncio.to_thread(s3_server.put_raw, f"pre/{KEY}", DATA)
        assert bytes(await o.get_chunk(CID, len(DATA))) == DATA
        pack_key = f"pre/packs/{CID.hex()[:2]}/{CID.hex()}"
        await asyncio.to_thread(s3_server.put_raw, pack_key, DATA)
        assert bytes(await o.get_pack_range(CID, 7, 70_000, len(DATA))) == DATA[7:70_007]
        f = fast_of(o)
        assert (f.taken, f.fallbacks) == (2, 0)
    finally:
        await o.close()


@pytest.mark.parametrize(
    ("env", "options"),
    [
        ({fastget.DISABLE: "0"}, {}),
        ({"HTTPS_PROXY": "http://proxy:3128"}, {}),
        ({"http_proxy": "http://proxy:3128"}, {}),
        ({}, {"allow_invalid_certificates": "true"}),
        ({}, {"request_payer": "true"}),
        ({"AWS_SSE_CUSTOMER_KEY_BASE64": "a2V5"}, {}),
    ],
)
def test_obstore_alone_where_its_requests_are_not_plain(
    env: dict[str, str],
    options: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", fastget.DISABLE):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3 = {
        "endpoint": "http://127.0.0.1:9",
        "region": "us-east-1",
        "access_key_id": "k",
        "secret_access_key": "s",
    }
    assert Origin("s3://b/o", {**s3, **options}, retry=FAST)._fast is None
    monkeypatch.undo()
    assert Origin("s3://b/o", s3, retry=FAST)._fast is not None
    assert Origin("http://127.0.0.1:9/o", {}, retry=FAST)._fast is not None
    # (a file:// origin's directory is made: one of the test's own, not nobody's HOME)
    assert Origin((tmp_path / "o").as_uri(), {}, retry=FAST)._fast is None


async def test_a_request_past_its_deadline_lets_go_of_its_socket(serve: Any) -> None:
    """The caller's deadline cancels the read; the thread blocked in it is released (its
    socket shut down, which the server sees), not left for the socket's own timeout."""
    released = asyncio.Event()

    class Stalling(Server):
        async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            me = asyncio.current_task()
            assert me is not None
            self.handlers.add(me)
            self.writers.add(writer)
            try:
                await reader.readuntil(b"\r\n\r\n")
                head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(DATA)
                writer.write(head + DATA[:100])
                await writer.drain()
                try:
                    gone = await reader.read() == b""
                except ConnectionError:  # (a close with bytes unread is a reset)
                    gone = True
                if gone:  # the client's end went away
                    released.set()
            finally:
                writer.transport.abort()  # closed here, not left to the collector
                self.handlers.discard(me)
                self.writers.discard(writer)

    s = Stalling(await serves(DATA))
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    o = Origin(f"http://127.0.0.1:{port}/o", {}, retry=RetryPolicy(1, 0.0, 0.0), timeout=0.5)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(OriginError, match="get chunk"):
                await o.get_chunk(CID, len(DATA))
            await released.wait()
    finally:
        await o.close()
        srv.close()
        await srv.wait_closed()
        await s.stop()  # (a connection of a fallback, say, still in its handler)


def test_a_stream_dropped_as_its_loop_ends_still_closes_its_socket() -> None:
    """A whole read stopped mid-body (its thread blocked in the receive) just before the
    loop ends, as at a shutdown: the thread closes the socket itself; a close left to a
    callback on the loop would never run, and the socket would wait for a collector."""
    served = socket.socket()
    served.bind(("127.0.0.1", 0))
    served.listen()
    port = served.getsockname()[1]
    held: list[socket.socket] = []

    async def main() -> tuple[fastget.FastGet, socket.socket]:
        o = Origin(f"http://127.0.0.1:{port}/o", {}, retry=FAST, timeout=30)
        fast = o._fast
        assert fast is not None
        stream = fast.whole("packs/x", len(DATA))
        opening = asyncio.ensure_future(stream.open())
        conn, _ = await asyncio.to_thread(served.accept)
        held.append(conn)
        await asyncio.to_thread(conn.recv, 4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(DATA) + DATA[:10])
        assert await opening
        sock = stream._sock
        assert sock is not None
        reading = asyncio.ensure_future(stream.read(len(DATA), lambda b: b))
        await asyncio.sleep(0)  # the receive is under way on its thread
        assert stream._busy is not None
        reading.cancel()
        await asyncio.sleep(0)  # the stream drops its socket; its thread is still in recv
        return fast, sock

    loop = asyncio.new_event_loop()
    try:
        fast, sock = loop.run_until_complete(main())
        loop.close()  # at once, as a process that is stopping: no more callbacks run
        fast._threads.shutdown(wait=True)
        assert sock.fileno() == -1, "the dropped stream's socket is still open"
    finally:
        for c in held:
            c.close()
        served.close()


def _tls_files(where: Path, expired: bool = False) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (with its key): PEM files. `expired`:
    the certificate's time ended a minute ago."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str, key: Any, issuer: str, signer: Any, ca: bool, san: bool
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(minutes=-1 if expired and not ca else 60))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            ip = ipaddress.ip_address("127.0.0.1")
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("hostd test CA", ca_key, "hostd test CA", ca_key, True, False)
    leaf = cert("127.0.0.1", key, "hostd test CA", ca_key, False, True)
    paths = (where / "ca.pem", where / "cert.pem", where / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def test_an_https_origin_is_read_through_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS, verified against the CA the environment names (SSL_CERT_FILE, as OpenSSL and
    obstore read it), on one kept-alive connection."""
    ca, certfile, keyfile = _tls_files(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    s = Server(await serves(DATA))
    listener = Accepting(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    srv = await asyncio.start_server(s.handle, sock=listener, ssl=context)
    port = srv.sockets[0].getsockname()[1]
    o = Origin(f"https://127.0.0.1:{port}/o", {}, retry=FAST)
    try:
        for _ in range(3):
            assert bytes(await o.get_chunk(CID, len(DATA))) == DATA
        assert (fast_of(o).taken, fast_of(o).fallbacks) == (3, 0)
        assert s.connections == 1
    finally:
        await o.close()
        srv.close()
        await srv.wait_closed()
        await s.stop()
        # A connection the client gave up during its handshake reaches no handler, and its
        # close (the client's EOF) may come after the test: wait for it, not for the GC.
        deadline = time.monotonic() + 30
        while any(c.fileno() >= 0 for c in listener.accepted):
            assert time.monotonic() < deadline, "a server connection stayed open"
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("another CA", "its signature does not verify against the issuer this host trusts"),
        ("expired", "it has expired"),
    ],
)
async def test_an_https_origin_whose_certificate_is_refused_says_so_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, why: str
) -> None:
    """A certificate from a CA the host does not trust, or one whose time is over: the error
    said 'error sending request' (the certificate shows only in obstore's debug dump, which
    messages leave out), after every retry, though each handshake meets the same
    certificate."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "ours").mkdir()
    ca, certfile, keyfile = _tls_files(tmp_path / "theirs", expired=case == "expired")
    trusted = _tls_files(tmp_path / "ours")[0] if case == "another CA" else ca
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    s = Server(await serves(DATA))
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0, ssl=context)
    port = srv.sockets[0].getsockname()[1]
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    o = Origin(f"https://127.0.0.1:{port}/o", {}, retry=FAST, sleep=sleep)
    try:
        with pytest.raises(OriginError, match=f"TLS certificate was refused: {why}"):
            await o.get_chunk(CID, len(DATA))
        assert slept == []
    finally:
        await o.close()
        srv.close()
        await srv.wait_closed()
        await s.stop()


@contextlib.contextmanager
def dropping_connects() -> Iterator[int]:
    """A port whose listener never accepts and whose queue is full: the kernel drops every
    further SYN, as a blackholed origin does, and a connect to it waits out its timeout."""
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            held.append(s)
        yield port
    finally:
        for s in held:
            s.close()
        listener.close()


async def connecting(fast: fastget.FastGet) -> None:
    """Until a request's thread is in its connect (its abort holds the socket)."""
    async with asyncio.timeout(10):
        while not any(a._sock is not None for a in fast._aborts):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_connect_that_gets_no_answer_ends_at_once_on_cancel_and_on_close() -> None:
    """Before, a cancel left the request's thread in its connect for the whole timeout (a
    pool of 16 threads could fill with them, and the daemon's exit waited for them)."""
    with dropping_connects() as port:
        fast = fastget.FastGet(lambda key: f"http://127.0.0.1:{port}/{key}", threads=1, timeout=30)
        loop = asyncio.get_running_loop()
        try:
            task = asyncio.create_task(fast.get("k", 100))
            await connecting(fast)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # the pool's one thread is free again: it runs the next job at once
            await asyncio.wait_for(loop.run_in_executor(fast._threads, lambda: None), 5)
            task = asyncio.create_task(fast.get("k", 100))
            await connecting(fast)
            fast.close()
            assert await asyncio.wait_for(task, 5) is None  # (obstore's turn, as any failure)
        finally:
            fast.close()


@contextlib.contextmanager
def silent_after_accept() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port that accepts connections (the kernel does, from its queue) and never says a
    word: a TLS client's hello waits for ever, as behind a balancer with a dead backend or
    an https:// URL aimed at a port that speaks something else."""
    listener = socket.socket()
    accepted: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1], accepted
    finally:
        for s in accepted:
            s.close()
        listener.close()


async def test_a_tls_handshake_that_gets_no_answer_times_out_and_ends_on_cancel() -> None:
    """Before, a thread shaking hands with a silent server was stuck for good: the abort
    held the plain socket that wrapping had emptied, and _ssl retries a blocking socket's
    want-read whatever its receive timeout says. Now the handshake has the request's
    timeout, and a cancel ends it at once."""
    with silent_after_accept() as (port, _):
        fast = fastget.FastGet(lambda key: f"https://127.0.0.1:{port}/{key}", threads=1, timeout=3)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(10):
                assert await fast.get("k", 100) is None  # timed out: obstore's turn
            fast._off_until = 0.0  # (on again: the next request is this path's too)
            task = asyncio.create_task(fast.get("k", 100))
            await connecting(fast)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            started = loop.time()
            await asyncio.wait_for(loop.run_in_executor(fast._threads, lambda: None), 5)
            assert loop.time() - started < 2.5  # freed by the cancel, not by the timeout
        finally:
            fast.close()


async def test_answers_whose_lines_end_in_a_bare_lf_are_taken(serve: Any) -> None:
    async def lf(path: str, headers: dict[str, str]) -> bytes:
        return f"HTTP/1.1 200 OK\nContent-Length: {len(DATA)}\n\n".encode() + DATA

    o = await serve(Server(lf))
    for _ in range(2):
        assert bytes(await o.get_chunk(CID, len(DATA))) == DATA
    assert (fast_of(o).taken, fast_of(o).fallbacks) == (2, 0)


async def test_an_encoded_or_multipart_answer_goes_to_obstore(serve: Any) -> None:
    """Content-Encoding nobody asked for, and a 206 that holds several parts (a length
    other than the range's, however large): not this path's to read."""

    async def gzip(path: str, headers: dict[str, str]) -> bytes:
        return plain(DATA, extra="Content-Encoding: gzip\r\n")

    o = await serve(Server(gzip))
    assert await fast_of(o).get(KEY, len(DATA)) is None

    async def multipart(path: str, headers: dict[str, str]) -> bytes:
        body = b"--b\r\nContent-Range: bytes 0-9/300000\r\n\r\n" + DATA[:10] + b"\r\n--b--\r\n"
        crange = "Content-Type: multipart/byteranges; boundary=b\r\n"
        return plain(body + b"x" * 100_000, "206 Partial Content", crange)

    o = await serve(Server(multipart))
    assert await fast_of(o).get(KEY, 10, (0, 10)) is None  # not Oversized


def test_plain_urls_are_the_keys_joined_onto_the_base_path_with_its_query() -> None:
    url = fastget._plain_urls("http://127.0.0.1:9/pré fix/%41/?tok=a%2Fb")
    assert url("packs/ab/cd") == "http://127.0.0.1:9/pr%C3%A9%20fix/%41/packs/ab/cd?tok=a%2Fb"
    assert fastget._plain_urls("https://[::1]:9")("k") == "https://[::1]:9/k"


async def test_an_origin_with_a_query_and_another_script_in_its_path_reads_right(
    tmp_path: Path,
) -> None:
    """The same objects, through a real web server, under a base whose path is not ASCII
    and which carries a query (a token): fastget asks for what obstore asks for."""
    base = tmp_path / "pré"
    (base / KEY).parent.mkdir(parents=True)
    (base / KEY).write_bytes(DATA)
    seen: list[str] = []

    async def files(path: str, headers: dict[str, str]) -> bytes:
        seen.append(path)
        from urllib.parse import unquote, urlsplit

        f = tmp_path / unquote(urlsplit(path).path).lstrip("/")
        return plain(f.read_bytes()) if f.is_file() else plain(b"<html>a listing</html>")

    s = Server(files)
    srv = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    o = Origin(f"http://127.0.0.1:{port}/pré?tok=abc", {}, retry=FAST)
    try:
        assert bytes(await o.get_chunk(CID, len(DATA))) == DATA
        assert (fast_of(o).taken, fast_of(o).fallbacks) == (1, 0)
        assert seen == [f"/pr%C3%A9/{KEY}?tok=abc"]
    finally:
        await o.close()
        srv.close()
        await srv.wait_closed()
        await s.stop()


async def test_a_range_answered_with_more_than_asked_is_cut_off_at_the_range(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 206 with the range asked for in its Content-Range, but a body (and stated length)
    a GiB longer: through obstore (fastget off), the read stops at the range, and so does
    the probe for ranges (a head is all it reads)."""
    monkeypatch.setenv("HOSTD_FAST_GET", "0")
    sent: list[int] = []

    async def fat(path: str, headers: dict[str, str]) -> bytes:
        a, b = (int(x) for x in headers["range"].removeprefix("bytes=").split("-"))
        head = f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{len(DATA)}\r\n"
        body = DATA[a : b + 1] + b"x" * (8 << 20)
        sent.append(len(body))
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    o = await serve(Server(fat))
    assert o._fast is None
    assert await o.answers_ranges(CID) is True
    with pytest.raises(ChunkCorrupt, match="sent more than 5000 bytes"):
        await o.get_pack_range(CID, 1000, 5000, len(DATA))
    assert sent  # (it was asked; what it sent past the range was never taken)


async def test_a_cancelled_request_leaves_no_failure_for_asyncio_to_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request given up on (a deadline, a caller gone) ends on its thread with a failure
    that nobody waits for: no "exception was never retrieved" error in the log for it."""
    with silent_after_accept() as (port, _):
        fast = fastget.FastGet(lambda key: f"http://127.0.0.1:{port}/{key}", threads=1, timeout=30)
        loop = asyncio.get_running_loop()
        try:
            task = asyncio.create_task(fast.get("k", 100))
            await connecting(fast)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            del task
            await asyncio.wait_for(loop.run_in_executor(fast._threads, lambda: None), 5)
            await asyncio.sleep(0.05)  # (the job's end reaches the loop)
            gc.collect()
            assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        finally:
            fast.close()


async def test_a_server_that_never_answers_this_path_turns_it_off() -> None:
    """A server that takes the connection and says nothing (to this path; obstore may fare
    better): each request gives up on this path within half the origin's timeout, a miss,
    and asks obstore in the time left; after OFF_AFTER of them the path is off. Before,
    the attempt's deadline cancelled it first, which counts as nothing: every request paid
    its whole deadline here, for good."""
    with silent_after_accept() as (port, _):
        o = Origin(f"http://127.0.0.1:{port}/o", {}, retry=FAST, timeout=1.0)
        try:
            for _ in range(fastget.OFF_AFTER):
                with pytest.raises(OriginError, match=r"^timeout: get chunk .* failed after"):
                    await o.get_chunk(CID, len(DATA))
                if not fast_of(o).on:
                    break
            assert not fast_of(o).on
            assert fast_of(o).fallbacks >= fastget.OFF_AFTER
        finally:
            await o.close()

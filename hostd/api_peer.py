"""The peer API: HTTP on a TCP port, for other hosts' hostd only.

    GET  /v1/chunks/<id>?size=N[&codec=C][&pull=1]   a chunk's raw bytes
         (a pull of a packed chunk adds &pack=<id>&off=O&len=L&psize=S: where it lies)
    POST /v1/have   {"ids": [<id>, ...]}  ->  {"have": [<id>, ...]}
    GET  /v1/health[?challenge=<hex>] ->  {"node", "name", "version", "time", "uploads",
         "waiting"} (a probe's challenge, asked from an address of this host, tells our
         own membership that the probe reached ourselves, and on which connection)

Every request must carry proof of the cluster secret (core/peerauth.py), or it is answered
401 before anything else is read; `[peers] allow_unauthenticated` turns that off. Ids must be
64 lower-case hex digits in full. Errors are `{"error": CODE, "message": TEXT}`.

A chunk is served from whichever local copy holds it: a complete blob (after the cache's
check), a blob still filling whose chunk was verified and written, or the buffer of chunks
this host pulled as owner. Blob bytes go by sendfile from a thread, straight from the page
cache to the socket (uvloop has no loop.sendfile, and aiohttp's fallback would copy every
byte through Python). With `pull=1` (the asker thinks we own the chunk) a chunk we lack is
fetched from the origin, through the one flight this host's own fills share, and served:
never from another peer (hop limit 1). The status and headers go out as soon as we know we
will serve, so the asker can tell a slow origin from a dead peer; a pull that then fails
cuts the connection, which the asker takes as "not served".

Uploads run at most `max_uploads` at a time; the rest wait their turn, and when as many wait
as run, an owner that knows hosts it already served answers 503 with them as `holders`, so
the load spreads over the hosts that have the chunk rather than queueing on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from hostd import __version__
from hostd.api_local import errors_as_json
from hostd.cache import Cache, Verdict
from hostd.core import manifest as mf
from hostd.core import peerauth
from hostd.core.ids import is_hex_id
from hostd.errors import ChunkCorrupt, ChunkMissing, HostdError, NotFound, UsageError
from hostd.fileio import send_range
from hostd.fill import Filler
from hostd.peers import (
    MAX_HAVE_IDS,
    MIN_RATE,
    NAME_HEADER,
    NODE_HEADER,
    PULL_MISS_BYTES,
    PULL_PRIORITY,
    SOURCE_HEADER,
    ChunkBuffer,
    Membership,
    OriginPull,
    PeerStats,
    PullGate,
    Uploads,
)

log = logging.getLogger(__name__)

# Where a verified copy of a chunk lies: a file and offset, or bytes in memory; None: nowhere.
Where = tuple[Path, int] | bytes | memoryview | None
Held = tuple[int, int] | bytes | memoryview | None  # the same, the file opened: (fd, offset)

MAX_BODY = 80 * MAX_HAVE_IDS + 1024  # a `have` request
# Bodies read before their proof is checked (the proof covers them), at once: anyone who can
# reach the port may send one, and each is held whole until its proof is checked (up to
# MAX_BODY for `timeout`): past this many, 503 (~21 MB at most, not 2,048 per address); and
# so that one address cannot take them all from the fleet's signed `have`s, this many each
# (a host asks as many at once as it fetches: `fetch_concurrency`, 16 by default).
UNPROVEN_BODIES = 64
UNPROVEN_PER_ADDRESS = 16


class Unauthorized(HostdError):
    code = "unauthorized"
    status = 401


class SelfRequest(HostdError):
    code = "self"
    status = 409


@dataclass
class PeerServer:
    """What the peer API serves from and how. Built by the daemon."""

    cache: Cache
    filler: Filler
    buffer: ChunkBuffer
    pull: OriginPull
    membership: Membership
    node: str
    secret: bytes | None
    max_uploads: int
    timeout: float
    stats: PeerStats
    patience: float = 0.1  # how long a busy owner holds an asker for the first copy to land
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.uploads = Uploads(self.max_uploads)
        self.pulls = PullGate(clock=time.monotonic)
        # request bodies being read before their proof is checked, by address
        self.unproven: Counter[str] = Counter()
        self.pool = ThreadPoolExecutor(self.max_uploads, thread_name_prefix="hostd-sendfile")

    def __repr__(self) -> str:
        return f"PeerServer({self.uploads!r})"

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def locate(self, chunk: mf.Chunk) -> Where:
        """Where a verified copy of the chunk lies: (file, offset) or the buffer's bytes."""
        loc = self.cache.chunk_location(chunk.id, chunk.size, small=True)
        if loc is not None:
            blob, offset = loc
            length = min(blob.chunk_size, blob.size - offset) if blob.chunk_size else -1
            if length == chunk.size and await self.cache.check(blob) is Verdict.INTACT:
                return blob.path, offset
        written = self.filler.written(chunk.id)
        if written is not None and written[2] == chunk.size:
            return written[0], written[1]
        return self.buffer.find(chunk)

    def holds(self, cid: bytes, in_blobs: bool) -> bool:
        """Cheap: a hint for `have`, not checked further (the asker verifies what it gets).
        `in_blobs`: the chunk map found it in a local blob (looked up for a whole batch)."""
        return in_blobs or self.filler.written(cid) is not None or self.buffer.peek(cid) is not None


SERVER_KEY: web.AppKey[PeerServer] = web.AppKey("peer_server")
SENDER_KEY: web.RequestKey[str] = web.RequestKey("sender", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def close_unproven(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A 401 closes its connection: kept alive, it would let anyone who can reach the port
    hold connections (against the guard's caps, hostd/guard.py) with a request a minute."""
    response = await handler(request)
    if response.status == 401:
        response.force_close()
    return response


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 unless the request proves the cluster secret; the sender's node id is kept."""
    srv = request.app[SERVER_KEY]
    if srv.secret is None:
        request[SENDER_KEY] = node = request.headers.get(NODE_HEADER, "")[:64]
        srv.membership.heard_from(request.headers.get(NAME_HEADER, ""), node)
        return await handler(request)
    header = request.headers.get("Authorization")
    if header is None:
        srv.stats.refused["unauthorized"] += 1
        raise Unauthorized(
            "this peer API needs proof of the cluster secret ([peers] secret_file); "
            "the request had no Authorization header"
        )
    name = request.headers.get(NAME_HEADER, "")
    try:
        t, _, _ = peerauth.parse(header)  # cheap checks before the body is read
        peerauth.check_time(t, srv.clock())
        if request.can_read_body and request.method != "POST":
            raise UsageError(f"a {request.method} request takes no body")
        address = request.remote or ""
        if request.can_read_body and (
            sum(srv.unproven.values()) >= UNPROVEN_BODIES
            or srv.unproven[address] >= UNPROVEN_PER_ADDRESS
        ):
            srv.stats.refused["busy"] += 1
            return _busy("this host is reading as many unproven request bodies as it may", [])
        srv.unproven[address] += request.can_read_body
        try:
            body = await _read_body(request, srv)
        finally:
            srv.unproven[address] -= request.can_read_body
            if not srv.unproven[address]:
                del srv.unproven[address]
        if body is None:  # cut: too slow (counted, not logged: anyone can do it)
            srv.stats.refused["slow"] += 1
            return web.Response(status=408)
        node = peerauth.verify(
            srv.secret, header, request.method, request.path_qs, srv.clock(), body, name=name
        )
    except peerauth.AuthError as e:
        srv.stats.refused["unauthorized"] += 1
        raise Unauthorized(str(e)) from None
    request[SENDER_KEY] = node
    srv.membership.heard_from(name, node)
    return await handler(request)


async def _read_body(request: web.Request, srv: PeerServer) -> bytes | None:
    """The body, whole within the peers' timeout: it is read before the proof is checked
    (the proof covers it), so anyone who can reach the port could otherwise hold a
    connection and its buffered body for ever by never sending the last bytes. Past it, the
    connection is cut, and None."""
    if not request.can_read_body:
        return b""
    try:
        async with asyncio.timeout(srv.timeout):
            return await request.read()
    except TimeoutError:
        _cut(request)
        return None


def _chunk_id(request: web.Request) -> bytes:
    text = request.match_info["id"]
    if not is_hex_id(text):
        raise UsageError(f"a chunk id is 64 lower-case hex digits, got {text[:80]!r}")
    return bytes.fromhex(text)


def _query_int(request: web.Request, key: str, lo: int, hi: int, default: int | None) -> int:
    text = request.query.get(key)
    if text is None:
        if default is None:
            raise UsageError(f"query parameter {key!r} is required")
        return default
    # (ASCII digits only: "²" is a digit int() refuses, "٧" one it reads as 7)
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or not lo <= int(text) <= hi:
        raise UsageError(f"query parameter {key!r} must be an integer {lo}..{hi}, got {text!r}")
    return int(text)


def _packed(request: web.Request, size: int) -> mf.Packed | None:
    """Where a pull finds a packed chunk at the origin (format 2), as the asker's manifest
    says. Only where to read: the bytes read are verified against the id like any others."""
    pack = request.query.get("pack")
    if pack is None:
        return None
    if not is_hex_id(pack):
        raise UsageError("query parameter 'pack' must be a 64-hex pack id")
    psize = _query_int(request, "psize", 1, 1 << 62, None)
    off = _query_int(request, "off", 0, psize - 1, None)
    length = _query_int(request, "len", 1, min(mf.max_stored_size(size), psize - off), None)
    return mf.Packed(bytes.fromhex(pack), off, length, psize)


async def chunk(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER_KEY]
    cid = _chunk_id(request)
    size = _query_int(request, "size", 1, mf.MAX_CHUNK_SIZE, None)
    codec = _query_int(request, "codec", 0, max(mf.CODECS), mf.CODEC_RAW)
    if codec not in mf.CODECS:
        raise UsageError(f"unknown codec {codec}")
    pull = request.query.get("pull", "0") == "1"
    if request[SENDER_KEY] == srv.node:
        raise SelfRequest("this request came from this host itself")
    want = mf.Chunk(cid, size, codec, _packed(request, size) if pull else None)
    where = await _open_held(srv, want)
    asker = request.headers.get(NAME_HEADER, "")[:300]
    address = request.remote or ""
    reads = _origin_bytes(want)
    try:
        if where is None and not pull:
            srv.stats.refused["missing"] += 1
            raise NotFound(f"chunk {cid.hex()} is not held here")
        if where is None and (barred := srv.pulls.barred(address)):
            srv.stats.refused["barred"] += 1
            raise NotFound(
                f"chunk {cid.hex()} is not held here, and no pull is made for {address} for "
                f"{barred:.0f} s: pulls it asked for did not verify, or named chunks the "
                "origin does not hold"
            )
        if where is None and srv.pulls.full(address, reads):
            srv.stats.refused["busy"] += 1
            return _busy(f"{address} has as many pulls in flight here as it may", [])
        # (counted from here, before any await: its other requests meanwhile see it)
        with srv.pulls.pulling(address, reads if where is None else 0):
            if (hint := await srv.uploads.admit(cid, asker, srv.patience)) is not None:
                srv.stats.refused["busy"] += 1
                return _busy(f"this host is busy uploading ({srv.uploads.limit} at once)", hint)
            with srv.uploads.taken():
                try:
                    resp, served = await _send(request, srv, want, where)
                except ConnectionError:  # the asker hung up (a lost hedge, a cancelled restore)
                    _cut(request)
                    return web.Response(status=499)  # never sent: the connection is gone
    finally:
        if isinstance(where, tuple):
            os.close(where[0])
    if served != "failed":
        srv.stats.served_chunks[served] += 1
        srv.stats.served_bytes[served] += size
        srv.uploads.served(cid, asker)
    return resp


async def _send(
    request: web.Request, srv: PeerServer, want: mf.Chunk, where: Held
) -> tuple[web.StreamResponse, str]:
    """Answer 200 and the chunk's bytes: from `where`, or pulled from the origin first (the
    status and headers go out before the pull, so the asker can tell a slow origin from a
    dead peer; a pull that fails cuts the connection)."""
    resp = web.StreamResponse(
        headers={
            SOURCE_HEADER: "pull" if where is None else "held",
            "Content-Type": "application/octet-stream",
        }
    )
    resp.content_length = want.size
    writer = await resp.prepare(request)
    send_headers = getattr(writer, "send_headers", None)
    if send_headers is not None:
        send_headers()  # now: the asker's deadline is on the headers
    if where is None:
        try:
            data = await srv.pull.fetch(want, PULL_PRIORITY)
        except HostdError as e:
            address = request.remote or ""
            if isinstance(e, ChunkCorrupt):  # (what it named at the origin is not the chunk)
                # (a GET at least, as a miss: of one byte, it was a GET for nothing too)
                wasted = max(_origin_bytes(want), PULL_MISS_BYTES)
                barred = srv.pulls.failed(address, wasted)
                log.warning(
                    "peer pull of chunk %s for %s did not verify (%s)%s",
                    want.id.hex(),
                    address,
                    e.message,
                    f": no pull for it for {barred:.0f} s" if barred else "",
                )
            elif isinstance(e, ChunkMissing):  # (a GET of the origin's, for nothing)
                wasted = max(_origin_bytes(want), PULL_MISS_BYTES)
                barred = srv.pulls.failed(address, wasted)
                log.info(
                    "peer pull of chunk %s for %s failed: %s%s",
                    want.id.hex(),
                    address,
                    e.message,
                    f": no pull for it for {barred:.0f} s" if barred else "",
                )
            else:
                log.info("peer pull of chunk %s failed: %s", want.id.hex(), e.message)
            _cut(request)
            return resp, "failed"
        if len(data) != want.size:  # cannot be: the flight is keyed by id, size and codec
            _cut(request)
            return resp, "failed"
        # Kept, owned or not: an asker that thinks we own it (membership differs), or anyone
        # replaying a signed pull to another host (the proof names none), asks again, and
        # each ask read the origin again. Not owned, in a share that cannot push out ours.
        srv.pull.keep(want, data)
        served, where = "pull", data
    else:
        served = "file" if isinstance(where, tuple) else "buffer"
    with srv.uploads.sending():
        if isinstance(where, tuple):
            await _sendfile(request, srv, where[0], where[1], want.size)
        else:
            # as sendfile's: an asker that does not read must not hold an upload slot
            try:
                async with asyncio.timeout(srv.timeout + want.size / MIN_RATE):
                    await resp.write(where)
            except TimeoutError:
                _cut(request)
                raise ConnectionResetError("the asker did not read the chunk in time") from None
        await resp.write_eof()
    return resp, served


def _origin_bytes(want: mf.Chunk) -> int:
    """What pulling `want` through reads from the origin, as its asker names it."""
    return max(want.size, want.packed.length if want.packed is not None else 0)


def _busy(message: str, holders: list[str]) -> web.Response:
    return web.json_response({"error": "busy", "message": message, "holders": holders}, status=503)


def _cut(request: web.Request) -> None:
    """End a response that cannot be completed: the asker sees a short body."""
    if request.transport is not None:
        request.transport.abort()


async def _open_held(srv: PeerServer, want: mf.Chunk) -> Held:
    """A verified copy of the chunk: an open (fd, offset), the buffer's bytes, or None. A
    file that went between the look and the open (evicted, or a partial blob completed) is
    looked for once more."""
    for _ in range(2):
        where = await srv.locate(want)
        if not isinstance(where, tuple):
            return where
        try:
            return os.open(where[0], os.O_RDONLY | os.O_CLOEXEC), where[1]
        except OSError:
            continue
    return None


async def _sendfile(request: web.Request, srv: PeerServer, fd: int, offset: int, n: int) -> None:
    """Send `n` bytes of `fd` at `offset` on the request's socket, by sendfile in a thread,
    once the headers have left (the transport's buffer empty): nothing else writes to the
    socket meanwhile. The socket is dup'ed so a connection closed under us cannot hand its
    number to another. A failure or a cancel cuts the connection: the asker never mistakes
    a short body for a chunk."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None:
        raise ConnectionResetError("the asker is gone")
    transport.set_write_buffer_limits(high=0)  # so drain() waits for an empty buffer
    await request.writer.drain()
    sock_fd = os.dup(sock.fileno())
    stop = threading.Event()

    def send() -> None:
        try:
            send_range(sock_fd, fd, offset, n, srv.timeout, stop)
        finally:
            os.close(sock_fd)

    job = asyncio.get_running_loop().run_in_executor(srv.pool, send)
    try:
        await asyncio.shield(job)
    except BaseException as e:
        stop.set()
        _cut(request)
        while not job.done():  # the fd it reads is ours to close only once it has stopped
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({job})
        if isinstance(e, OSError | EOFError):  # a receiver gone or stalled, a file cut short
            raise ConnectionResetError(f"sendfile stopped: {e}") from e
        raise


async def have(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER_KEY]
    try:
        doc = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UsageError('the body must be JSON: {"ids": [...]}') from None
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_HAVE_IDS:
        raise UsageError(f'"ids" must be an array of at most {MAX_HAVE_IDS} chunk ids')
    for i, text in enumerate(ids):
        if not isinstance(text, str) or not is_hex_id(text):
            raise UsageError(f"ids[{i}] is not 64 lower-case hex digits")
    wanted = [bytes.fromhex(t) for t in ids]
    # One index read for the batch, off the loop (up to 4096 ids).
    stored = await asyncio.to_thread(srv.cache.snaps.have_locations, wanted)
    out = [
        text
        for text, cid in zip(ids, wanted, strict=True)
        if srv.holds(cid, any(srv.cache.locate(d) is not None for d in stored.get(cid, ())))
    ]
    return web.json_response({"have": out})


async def health(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER_KEY]
    challenge = request.query.get("challenge", "")
    if 0 < len(challenge) <= 64:  # a probe's: did it come from this host? (Membership.probe)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        srv.membership.reached(challenge, peer)
    return web.json_response(
        {
            "node": srv.node,
            "name": srv.membership.roster.self_name,
            "version": __version__,
            "time": srv.clock(),
            "uploads": srv.uploads.uploading,
            "pending": srv.uploads.pending,
        }
    )


def make_peer_app(server: PeerServer) -> web.Application:
    app = web.Application(
        middlewares=[close_unproven, errors_as_json, authenticate], client_max_size=MAX_BODY
    )
    app[SERVER_KEY] = server
    app.router.add_get("/v1/chunks/{id}", chunk, allow_head=False)
    app.router.add_post("/v1/have", have)
    app.router.add_get("/v1/health", health, allow_head=False)
    return app

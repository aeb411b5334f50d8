"""Peers as a chunk source: ask the chunk's owner, then peers that have it; never forward.

The client half of the peer API (api_peer.py is the server half). `PeerSource.get(chunk)`
places the chunk over the live members plus this host (rendezvous hashing, core/rendezvous.py)
and asks, in order:

1. the owner, with `pull=1`: an owner that lacks the chunk fetches it from the origin once
   (its own single flight, shared by every host that asks) and serves everyone. If the owner
   has not answered within `hedge_after`, the next peer known to hold the chunk is raced
   against it, and the loser is cancelled;
2. other peers that hold it (`pull=0`: serve only what you have), found from the owner's
   hint when it is busy and from `have` queries to the peers ranked next for the chunk.

If none of them serves it, the chunk is ChunkMissing and the fetcher goes on to the origin:
the origin is never a hedge, so a slow owner pulling through a slow origin is not joined by
every other host pulling the same bytes. Every answer is read with a cap (the chunk's raw
size, exactly) and verified before it is returned; a peer that sends bad bytes or stalls is
struck, one that cannot be reached is marked dead, one that answers 401 is marked rejecting
(core/members.py). Nothing here ever fails a restore: the origin is the last resort.

A pull-through is never forwarded: the peer server answers only from its own tiers, its
buffer or the origin (hop limit 1), so hosts that disagree about membership cannot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import aiohttp

from hostd.core import codec, peerauth, rendezvous
from hostd.core.ids import is_hex_id
from hostd.core.manifest import Chunk
from hostd.core.members import SILENT_STRIKE, STRIKE_MAX, Member, Roster, State
from hostd.errors import ChunkCorrupt, ChunkMissing
from hostd.fetch import Fetcher, Priority
from hostd.unixhttp import BodyDecoder, ConnectionClosed, ProtocolError, parse_head

log = logging.getLogger(__name__)

HAVE_FANOUT = 8  # peers asked whether they hold a chunk, when its owner could not serve it
HAVE_TTL = 2.0  # seconds an answer to `have` is trusted
MAX_HAVE_IDS = 4096  # ids in one `have` request
HEALTH_BYTES = 64 * 1024  # the most a health answer may be
# The slowest a chunk may come from a peer, or go to one, past the timeout: one that trickles
# a byte a timeout keeps its connection for ever and holds a fetch slot (the origin is
# faster); it is struck instead.
MIN_RATE = 1 << 20  # bytes a second
NODE_HEADER = "X-Hostd-Node"  # the sender's node id (also in the signed Authorization)
NAME_HEADER = "X-Hostd-Name"  # the sender's member name, when it knows it (owner hints)
SOURCE_HEADER = "X-Hostd-Source"  # how a chunk is served: "held" or "pull"
PULL_PRIORITY: Priority = (-1,)  # pull-throughs for other hosts go before our own fills
RECIPIENTS_KEPT = 8  # hosts remembered per chunk, for busy answers
RECIPIENT_CHUNKS = 65536  # chunks they are remembered for
BUSY_WAIT_BASE = 0.05  # the first wait between two rounds of asking, s (doubling, jittered)
BUSY_WAIT_MAX = 0.25  # the longest
# Every member stalling on this host within this many peer timeouts of each other is this
# host cut off from them, not each of them at fault (Membership._cut_off)
CUT_OFF_WINDOW = 2
# How long a member that was busy to everything for a whole busy wait before, serving none,
# is waited on when it is busy anew, until it serves a chunk (PeerSource._waits_on)
SPENT_BUSY_WAIT = 1.0
HOLDER_TRIES = 8  # holders asked per round


class PeerFailure(Exception):
    """One peer could not serve one request. `kind` decides what happens to the peer: dead
    (unreachable, or no connection made within the timeout), rejected (401), stall and
    corrupt (struck), silent (it took a chunk request, 200, and sent nothing for the wait, or
    hung up on it after the timeout: struck when again, core/members.py SILENT_STRIKE), self
    (it is us), and missing, busy, failed (nothing: it is fine, it just has not got it, or
    broke off within the timeout: going away, or its own pull failed)."""

    def __init__(self, kind: str, message: str, holders: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.holders = holders or []


@dataclass
class PeerStats:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, result)
    chunks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (role, how)
    bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    strikes: Counter[str] = field(default_factory=Counter)  # reason
    hedges: Counter[str] = field(default_factory=Counter)  # started, won
    busy_waits: int = 0  # rounds waited because every peer asked was busy
    served_chunks: Counter[str] = field(default_factory=Counter)  # source: file, buffer, pull
    served_bytes: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # unauthorized, busy, missing


Observe = Callable[[str, str, float], None]  # (request kind, result, seconds)


class ChunkBuffer:
    """Recent chunks this host pulled from the origin, in memory, LRU by bytes: the owner
    serves the hosts that ask after its flight landed without asking the origin again, and
    its own restore finds them here too. Holds verified bytes only.

    Chunks it pulled for an asker without owning them (a member whose view of the
    membership differs, a signed pull replayed to another host) are kept too, so that their
    repeats do not read the origin again, but in a share of their own (OTHERS_SHARE of the
    bytes): however many of them an asker cycles through, they push out only each other,
    never the chunks this host owns."""

    name = "buffer"
    OTHERS_SHARE = 0.25

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._owned: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._others: OrderedDict[bytes, bytes | memoryview] = OrderedDict()
        self._others_used = 0

    def __repr__(self) -> str:
        held = len(self._owned) + len(self._others)
        return f"ChunkBuffer({self.used}/{self.capacity}, chunks={held})"

    def put(self, cid: bytes, data: bytes | memoryview, *, owned: bool = True) -> None:
        """Keep `data` as it is, not a copy: a fetched chunk's buffer is never written again.
        An owned chunk takes any room; one held for others takes room only from others."""
        if cid in self._owned or len(data) > self.capacity:
            return
        if cid in self._others:
            if not owned:
                return
            moved = len(self._others.pop(cid))
            self._others_used -= moved
            self.used -= moved
        if owned:
            self._owned[cid] = data
        else:
            if len(data) > self.capacity * self.OTHERS_SHARE:
                return
            self._others[cid] = data
            self._others_used += len(data)
            while self._others_used > self.capacity * self.OTHERS_SHARE:
                self._others_used -= self._pop(self._others)
        self.used += len(data)
        while self.used > self.capacity:
            if self._others:
                self._others_used -= self._pop(self._others)
            else:
                self._pop(self._owned)

    def _pop(self, chunks: OrderedDict[bytes, bytes | memoryview]) -> int:
        _, old = chunks.popitem(last=False)
        self.used -= len(old)
        return len(old)

    def peek(self, cid: bytes) -> bytes | memoryview | None:
        for chunks in (self._owned, self._others):
            data = chunks.get(cid)
            if data is not None:
                chunks.move_to_end(cid)
                return data
        return None

    def find(self, chunk: Chunk) -> bytes | memoryview | None:
        """The chunk's bytes if held, at the chunk's own size."""
        data = self.peek(chunk.id)
        return data if data is not None and len(data) == chunk.size else None

    async def get(self, chunk: Chunk) -> bytes | memoryview:
        data = self.find(chunk)
        if data is None:
            raise ChunkMissing(f"chunk {chunk.id.hex()} is not in the peer buffer")
        return data


class Uploads:
    """The serving side's gate: at most `limit` requests in hand at once (pulling the chunk
    through, or sending it). Past that an asker is told busy, with up to 4 hosts this one
    already sent the chunk to, so the load spreads over the hosts that have it instead of
    queueing on one; with none to name yet (the owner's own pull is still under way), the
    asker waits a little and asks again."""

    def __init__(self, limit: int, rng: random.Random | None = None) -> None:
        self.limit = limit
        self.pending = 0  # taken, not finished
        self.uploading = 0  # sending now
        self.rng = rng or random.Random()
        self._recipients: OrderedDict[bytes, list[str]] = OrderedDict()
        self._landed: dict[bytes, asyncio.Event] = {}  # set when a copy was sent in full

    def __repr__(self) -> str:
        return f"Uploads({self.uploading} sending, {self.pending}/{self.limit} taken)"

    async def admit(self, cid: bytes, asker: str, patience: float) -> list[str] | None:
        """None: take the request (then serve it inside `taken`). A list: answer busy,
        naming these hosts that have the chunk (maybe none). With no host to name yet (the
        owner's own pull is under way), wait up to `patience` for the first one to be sent
        the chunk: asked again, it would only be told busy again."""
        if self.pending < self.limit:
            return None
        hint = self.holders(cid, asker)
        if hint:
            return hint
        if len(self._landed) > RECIPIENT_CHUNKS:
            self._landed.clear()
        landed = self._landed.setdefault(cid, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await landed.wait()
        if self.pending < self.limit:
            return None
        return self.holders(cid, asker)

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        self.uploading += 1
        try:
            yield
        finally:
            self.uploading -= 1

    def served(self, cid: bytes, name: str) -> None:
        """Remember a host we sent `cid` to in full."""
        if not name:
            return
        landed = self._landed.pop(cid, None)
        if landed is not None:
            landed.set()
        got = [n for n in self._recipients.pop(cid, []) if n != name]
        self._recipients[cid] = [*got[-(RECIPIENTS_KEPT - 1) :], name]
        while len(self._recipients) > RECIPIENT_CHUNKS:
            self._recipients.popitem(last=False)

    def holders(self, cid: bytes, asker: str) -> list[str]:
        got = [n for n in self._recipients.get(cid, []) if n != asker]
        self.rng.shuffle(got)  # spread the askers over them
        return got[:4]


# Pull-throughs an asking address may have in flight at one owner, in bytes read from the
# origin (one at least, whatever its size): an asker can make the owner read up to a chunk's
# most (256 MiB) from its origin with one request of a few hundred bytes.
PULL_BYTES_PER_ASKER = 64 << 20
# Bytes an asking address may make the owner read from its origin for pulls that did not
# verify (PULL_MISS_BYTES each at least, a GET; the bytes it named at the origin are not the
# chunk it named: a lying asker, or an origin whose bytes rotted: the owner cannot tell
# which), past which it gets no pull until they drain, at PULL_WASTE_RATE a second: a lying
# asker's bytes are bounded by the rate, and an honest one meeting a rotten pack is barred
# only once its waste passes a burst's worth.
PULL_WASTE_BURST = 128 << 20
PULL_WASTE_RATE = 2 << 20
PULL_ASKERS_KEPT = 4096  # addresses whose waste is remembered (the oldest forgotten first)
# A pull of a chunk the origin does not hold costs the owner a GET whatever the size it
# names: it counts as this many bytes of waste, so an address naming ids nobody published
# makes the owner ask the origin PULL_WASTE_BURST / PULL_MISS_BYTES times, then two a second.
PULL_MISS_BYTES = 1 << 20


class PullGate:
    """The owner's bounds on the pull-throughs each asking address makes it do: bytes in
    flight (PULL_BYTES_PER_ASKER), and bytes read for pulls that did not verify or named a
    chunk the origin does not hold (PULL_MISS_BYTES each; a bucket of PULL_WASTE_BURST
    draining at PULL_WASTE_RATE: full, no pull until it drains). Keyed by
    the address the request came from: the node id and member name a request carries are
    the sender's to choose (hosts behind one address share its bounds)."""

    def __init__(
        self,
        budget: int = PULL_BYTES_PER_ASKER,
        clock: Callable[[], float] = time.monotonic,
        burst: int = PULL_WASTE_BURST,
        rate: float = PULL_WASTE_RATE,
    ) -> None:
        self.budget = budget
        self.clock = clock
        self.burst = burst
        self.rate = rate
        self._flying: dict[str, int] = {}
        self._wasted: OrderedDict[str, tuple[float, float]] = OrderedDict()  # bytes, at

    def __repr__(self) -> str:
        return f"PullGate({len(self._flying)} asking, {len(self._wasted)} with waste)"

    def _waste(self, address: str, now: float) -> float:
        got = self._wasted.get(address)
        if got is None:
            return 0.0
        wasted, at = got
        return max(0.0, wasted - (now - at) * self.rate)

    def barred(self, address: str) -> float:
        """Seconds until `address` may ask for a pull again (0: now)."""
        over = self._waste(address, self.clock()) - self.burst
        return over / self.rate if over > 0 else 0.0

    def full(self, address: str, nbytes: int) -> bool:
        """Whether `address` has as many bytes of pulls in flight as it may, with `nbytes` more."""
        flying = self._flying.get(address, 0)
        return flying > 0 and flying + nbytes > self.budget

    @contextlib.contextmanager
    def pulling(self, address: str, nbytes: int) -> Iterator[None]:
        """A pull-through for `address` of `nbytes` in flight while the body runs."""
        if nbytes <= 0:
            yield
            return
        self._flying[address] = self._flying.get(address, 0) + nbytes
        try:
            yield
        finally:
            left = self._flying.get(address, 0) - nbytes
            if left > 0:
                self._flying[address] = left
            else:
                self._flying.pop(address, None)

    def failed(self, address: str, nbytes: int) -> float:
        """A pull `address` asked for, of `nbytes` read, did not verify (or, counted as
        PULL_MISS_BYTES at least, found no such chunk). The seconds it is barred for now (0:
        not yet)."""
        now = self.clock()
        wasted = self._waste(address, now) + nbytes
        self._wasted.pop(address, None)
        self._wasted[address] = (wasted, now)
        while len(self._wasted) > PULL_ASKERS_KEPT:
            self._wasted.popitem(last=False)
        return self.barred(address)


class OriginPull:
    """The origin behind its own single flight, shared by this host's fills and the pulls
    other hosts ask of it as owner; a chunk this host owns is kept in the buffer."""

    name = "origin"

    def __init__(
        self,
        fetcher: Fetcher,
        buffer: ChunkBuffer,
        owns: Callable[[bytes], bool],
        key: Callable[[Chunk], bytes] = lambda c: c.id,
    ):
        self.fetcher = fetcher
        self.buffer = buffer
        self.owns = owns
        self.key = key  # what a chunk's owner is found by (PeerSource.owner_key)

    def __repr__(self) -> str:
        return f"OriginPull({self.fetcher!r})"

    async def fetch(self, chunk: Chunk, priority: Priority) -> bytes | memoryview:
        data, _ = await self.fetcher.get(chunk, priority)
        if self.owns(self.key(chunk)):
            self.buffer.put(chunk.id, data)
        return data

    def keep(self, chunk: Chunk, data: bytes | memoryview) -> None:
        """Keep a chunk pulled for an asker, owned or not (`ChunkBuffer`'s shares)."""
        self.buffer.put(chunk.id, data, owned=self.owns(self.key(chunk)))

    async def get(self, chunk: Chunk) -> bytes | memoryview:
        return await self.fetch(chunk, (0,))


class PeerClient:
    """HTTP to other hosts' peer servers: signed requests, capped and verified answers."""

    def __init__(
        self,
        node: str,
        secret: bytes | None,
        timeout: float,
        pull_wait: float,
        observe: Observe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.secret = secret
        self.timeout = timeout
        self.pull_wait = pull_wait  # first byte of a pull-through: the owner's origin fetch
        self.name = ""  # our member name, once membership has found it
        self.observe = observe
        self.clock = clock
        self.stats = PeerStats()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"PeerClient(node={self.node}, auth={'hmac' if self.secret else 'none'})"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=10),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                trace_configs=[_connections_told()],
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        h = {NODE_HEADER: self.node}
        if self.name:
            h[NAME_HEADER] = self.name
        if self.secret is not None:
            t = int(self.clock())
            h["Authorization"] = peerauth.sign(
                self.secret, method, target, t, self.node, body, self.name
            )
        return h

    async def _send(
        self, name: str, method: str, target: str, body: bytes = b""
    ) -> aiohttp.ClientResponse:
        """Send a request; the answer's status and headers must come within `timeout`."""
        told: dict[str, bool] = {}  # "connected", once a connection is made or reused
        try:
            async with asyncio.timeout(self.timeout):
                return await self._http().request(
                    method,
                    f"http://{name}{target}",
                    data=body or None,
                    headers=self.headers(method, target, body),
                    allow_redirects=False,
                    trace_request_ctx=told,
                )
        except TimeoutError:  # (aiohttp's own connect timeout is one too)
            raise _timed_out(name, self.timeout, told.get("connected", False)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise PeerFailure("dead", f"peer {name}: {_cause(e)}") from None

    async def _refusal(self, name: str, resp: aiohttp.ClientResponse) -> PeerFailure:
        """A non-200 answer as a PeerFailure (the body read with a small cap)."""
        try:
            doc = _json(await self._small(name, resp, HEALTH_BYTES))
        except PeerFailure:
            doc = {}
        return _refused(name, resp.status, resp.reason, doc)

    async def chunk(
        self, name: str, chunk: Chunk, pull: bool, answered: asyncio.Event | None = None
    ) -> tuple[memoryview, str]:
        """The chunk's raw bytes from peer `name`, verified; and how it served them.
        `answered` is set once the peer has said it will serve them (its status line)."""
        target = f"/v1/chunks/{chunk.id.hex()}?size={chunk.size}&codec={chunk.codec}"
        if pull:
            target += "&pull=1"
            if (p := chunk.packed) is not None:  # where the owner finds it at the origin
                target += f"&pack={p.pack.hex()}&off={p.offset}&len={p.length}&psize={p.pack_size}"
        with self._timed("chunk"):
            resp = await self._send(name, "GET", target)
            async with resp:
                if resp.status != 200:
                    raise await self._refusal(name, resp)
                how = resp.headers.get(SOURCE_HEADER, "held")
                if answered is not None:
                    answered.set()
                if resp.content_length != chunk.size:
                    raise PeerFailure(
                        "corrupt",
                        f"peer {name} offered {resp.content_length} bytes for chunk "
                        f"{chunk.id.hex()} of {chunk.size}",
                    )
                # (the pull wait only where we asked for a pull: a holder's answer that says
                # "pull" to a plain request gets the timeout)
                first_wait = self.pull_wait if pull and how == "pull" else 0
                data = await self._body(name, resp, chunk, first_wait)
            try:
                if len(data) <= 256 * 1024:
                    codec.verify(chunk, data)
                else:
                    await asyncio.to_thread(codec.verify, chunk, data)
            except ChunkCorrupt as e:
                raise PeerFailure("corrupt", f"peer {name}: {e.message}") from None
            return data, how

    async def _body(
        self, name: str, resp: aiohttp.ClientResponse, chunk: Chunk, first_wait: float
    ) -> memoryview:
        """Read exactly chunk.size bytes into one buffer: no more is ever buffered. Each read
        must bring bytes within `timeout` (the first within `first_wait` when the owner pulls
        through from its origin, which may be slow: that is not a stalled peer). One deadline,
        moved on at each read, rather than a timer per read."""
        buf = bytearray(chunk.size)
        got = 0
        wait = max(first_wait, self.timeout)
        loop = asyncio.get_running_loop()
        began = loop.time()
        # and the whole body by then, however steadily it trickles (MIN_RATE)
        end = loop.time() + wait + self.timeout + chunk.size / MIN_RATE
        try:
            async with asyncio.timeout(wait) as deadline:
                while got < chunk.size:
                    piece = await resp.content.readany()
                    if not piece:
                        break
                    if got + len(piece) > chunk.size:
                        raise PeerFailure(
                            "corrupt", f"peer {name} sent more than {chunk.size} bytes"
                        )
                    buf[got : got + len(piece)] = piece
                    got += len(piece)
                    deadline.reschedule(min(loop.time() + self.timeout, end))
        except TimeoutError:
            kind = "stall" if got or not first_wait else "silent"
            if got and loop.time() >= end:
                why = f"sent {got} of {chunk.size} bytes, slower than {MIN_RATE >> 20} MiB/s"
            else:
                why = f"sent nothing for {wait if not got else self.timeout:g} s"
                why += f" ({got}/{chunk.size} bytes)"
            raise PeerFailure(kind, f"peer {name} {why}") from None
        except (aiohttp.ClientError, OSError) as e:
            why = _cause(e)
            raise _cut_short(name, chunk, got, loop.time() - began, self.timeout, why) from None
        if got != chunk.size:
            raise _cut_short(name, chunk, got, loop.time() - began, self.timeout, "closed")
        return memoryview(buf)

    async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
        """Which of `cids` peer `name` holds."""
        body = json.dumps({"ids": [c.hex() for c in cids[:MAX_HAVE_IDS]]}).encode()
        with self._timed("have"):
            resp = await self._send(name, "POST", "/v1/have", body)
            async with resp:
                if resp.status != 200:
                    raise await self._refusal(name, resp)
                raw = await self._small(name, resp, 80 * MAX_HAVE_IDS + 1024)
        got = _json(raw).get("have")
        said = (
            {bytes.fromhex(h) for h in got if isinstance(h, str) and is_hex_id(h)}
            if isinstance(got, list)
            else set()
        )
        return said & set(cids)

    async def health(
        self, name: str, challenge: str = ""
    ) -> tuple[dict[str, Any], tuple[str, int] | None]:
        """`name`'s health answer, and our end (address, port) of the connection that asked
        for it; `challenge`, where given, goes with the request (a probe's: see
        Membership.probe). On a connection of its own, closed after the answer, whose end
        we know (aiohttp's pooled ones do not say), within `timeout` in all."""
        target = f"/v1/health?challenge={challenge}" if challenge else "/v1/health"
        host, _, port = name.rpartition(":")
        if not port.isascii() or not port.isdigit():
            raise PeerFailure("dead", f"peer {name}: no port to reach it on")
        writer: asyncio.StreamWriter | None = None
        with self._timed("health"):
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
                    ours = endpoint(writer.get_extra_info("sockname"))
                    head = [f"GET {target} HTTP/1.1", f"Host: {name}", "Connection: close"]
                    head += [f"{k}: {v}" for k, v in self.headers("GET", target).items()]
                    writer.write("\r\n".join([*head, "", ""]).encode("latin-1"))
                    status, reason, raw = await _small_answer(reader, HEALTH_BYTES)
            except TimeoutError:
                raise _timed_out(name, self.timeout, writer is not None) from None
            except (ProtocolError, ValueError, UnicodeError) as e:  # (int() of a "digit")
                raise PeerFailure("failed", f"peer {name} answered other than HTTP: {e}") from None
            except OSError as e:  # (refused, reset, closed before an answer: ConnectionClosed)
                raise PeerFailure("dead", f"peer {name}: {_cause(e)}") from None
            finally:
                if writer is not None:
                    writer.close()
            if status != 200:
                raise _refused(name, status, reason, _json(raw))
            return _json(raw), ours

    async def _small(self, name: str, resp: aiohttp.ClientResponse, cap: int) -> bytes:
        if resp.content_length is not None and resp.content_length > cap:
            raise PeerFailure("failed", f"peer {name} answered {resp.content_length} bytes")
        raw = b""
        try:
            async with asyncio.timeout(self.timeout):
                while len(raw) <= cap:  # read() returns what is there: loop to the end
                    piece = await resp.content.read(cap + 1 - len(raw))
                    if not piece:
                        break
                    raw += piece
        except TimeoutError:
            raise PeerFailure("stall", f"peer {name} stalled mid-answer") from None
        except (aiohttp.ClientError, OSError) as e:
            raise PeerFailure("failed", f"peer {name}: {_cause(e)}") from None
        if len(raw) > cap:
            raise PeerFailure("failed", f"peer {name} answered more than {cap} bytes")
        return raw

    @contextlib.contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        """Count and time one request by its result: ok, the PeerFailure's kind, or error."""
        started = time.monotonic()
        result = "error"
        try:
            yield
            result = "ok"
        except PeerFailure as e:
            result = e.kind
            raise
        finally:
            self.stats.requests[(kind, result)] += 1
            if self.observe is not None:
                self.observe(kind, result, time.monotonic() - started)


def _connections_told() -> aiohttp.TraceConfig:
    """Tells each request's context (`trace_request_ctx`, a dict) "connected" once its
    connection is made or taken from the pool: a timeout before that is no host there."""

    async def connected(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: object) -> None:
        told = ctx.trace_request_ctx
        if isinstance(told, dict):
            told["connected"] = True

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(connected)
    trace.on_connection_reuseconn.append(connected)
    return trace


def _timed_out(name: str, timeout: float, connected: bool) -> PeerFailure:
    """A request that got no answer within `timeout`. Before a connection was made: no host
    there (a SYN unanswered: switched off, or a full queue), dead, probed again after its
    backoff; after: a member that stalls, struck for a while."""
    if not connected:
        return PeerFailure("dead", f"peer {name}: no connection in {timeout:g} s")
    return PeerFailure("stall", f"peer {name} sent no answer in {timeout:g} s")


def _cut_short(
    name: str, chunk: Chunk, got: int, took: float, timeout: float, why: str
) -> PeerFailure:
    """A chunk's body that ended (`why`: closed, reset) `took` seconds after its 200, with
    `got` bytes of it. Within `timeout`: "failed" (a member going away, or its own pull
    failing: an origin that refused it, which strikes no one; asked once more). Later:
    "silent", counted (SILENT_STRIKE), as if we had given up waiting: a member that says yes
    and hangs up just before any deadline it could trip cost each chunk the pull wait, twice,
    for good; now a timeout at most, and it is struck."""
    kind = "failed" if took < timeout else "silent"
    return PeerFailure(
        kind,
        f"peer {name} took chunk {chunk.id.hex()}, then {why} after {got} of {chunk.size} "
        f"bytes in {took:.1f} s",
    )


def _refused(name: str, status: int, reason: str | None, doc: dict[str, Any]) -> PeerFailure:
    """A member's non-200 answer (its JSON body `doc`) as a PeerFailure."""
    # (its text, escaped: a member's newlines and terminal escapes must not forge lines in
    # our log, our status or a restore's error)
    msg = "".join(
        c if c.isprintable() else ascii(c)[1:-1]
        for c in str(doc.get("message", reason or status))[:300]
    )
    kinds = {401: "rejected", 404: "missing", 409: "self", 503: "busy"}
    holders = doc.get("holders")
    hint = [h for h in holders if isinstance(h, str)][:16] if isinstance(holders, list) else []
    return PeerFailure(kinds.get(status, "failed"), f"peer {name}: {msg}", hint)


async def _small_answer(reader: asyncio.StreamReader, cap: int) -> tuple[int, str, bytes]:
    """(status, reason, body) of an HTTP/1.1 answer of at most `cap` bytes after its head
    (framing and trailers included; unixhttp's framing); ConnectionClosed where it ended
    before a head, ProtocolError for anything else."""
    try:
        raw_head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise ConnectionClosed("the connection ended before an answer") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("an answer's head longer than 64 KiB") from None
    head = parse_head(raw_head[:-4])
    decoder = BodyDecoder(head)
    body = bytearray()
    read = 0
    while not decoder.done:
        data = await reader.read(65536)
        if not data:
            decoder.end()
            break
        read += len(data)
        body += decoder.feed(data)
        if read > cap:
            raise ProtocolError(f"an answer of more than {cap} bytes")
    return head.status, head.reason, bytes(body)


def _json(raw: bytes) -> dict[str, Any]:
    """A peer's JSON answer as a dict; {} for anything else (nesting past the parser's
    recursion limit too: a member's health answer of `[`s must not end the daemon)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _cause(e: BaseException) -> str:
    """A short cause for a failed connection: the OS error's text where there is one."""
    inner: BaseException | None = e
    while inner is not None:
        if isinstance(inner, OSError) and inner.errno:
            return os.strerror(inner.errno)  # not the loop's "Connect call failed (...)"
        inner = inner.__cause__ or inner.__context__
    return str(e) or type(e).__name__


class Membership:
    """Who the peers are: the static list and DNS names re-resolved every `dns_refresh`;
    probes (health) of new members and of dead or rejecting ones when their backoff runs out.
    Live members are not polled: a failed request marks one dead, which scales to thousands
    of hosts. This host is found in the list by an address bound to this host with our
    port, or by a probe that reached our own server on the probe's own connection: each
    probe carries a fresh random challenge, and our server notes the challenges it is asked
    from an address of this host, with the far end of the connection that brought each.
    What a member answers cannot make it "self": one that echoes our node id, answers 409
    "self" (probed again, at most every SELF_REPROBE), or relays our probe to us (on a
    connection of its own) is another host."""

    def __init__(
        self,
        static: tuple[str, ...],
        dns: tuple[str, ...],
        dns_refresh: float,
        client: PeerClient,
        clock: Callable[[], float] = time.monotonic,
        placements: dict[frozenset[str], rendezvous.Placement] | None = None,
    ) -> None:
        self.static = static
        self.dns = dns
        self.dns_refresh = dns_refresh
        self.client = client
        self.clock = clock
        self.roster = Roster()
        self.port = 0  # our peer port, once bound
        self._resolved: dict[str, set[str]] = {}  # dns entry -> member names last seen
        self._wake = asyncio.Event()
        # Placements by member set: shared between hosts by the fleet simulation
        self._placements = placements if placements is not None else {}
        self._placement: tuple[int, rendezvous.Placement] | None = None
        # Challenges of the probes in flight -> the far end (address, port) of the
        # connection on which one reached our own server, from an address of this host.
        self._challenges: dict[str, tuple[str, int] | None] = {}
        # When each member last stalled on us (report): every one within a timeout or two of
        # the others is this host cut off, not each of them at fault
        self._stalled: dict[str, float] = {}
        self._cut_at = float("-inf")  # when this host last counted itself cut off

    def __repr__(self) -> str:
        return f"Membership({self.roster!r}, self={self.roster.self_name})"

    def placement(self) -> list[str]:
        return self.roster.placement(self.clock())

    def current(self) -> rendezvous.Placement:
        """The placement over the usable members plus self, rebuilt only when they change."""
        self.roster.tick(self.clock())  # a strike that ran out changes the set
        if self._placement is None or self._placement[0] != self.roster.version:
            key = frozenset(self.roster.placement(self.clock()))
            p = self._placements.get(key)
            if p is None:
                if len(self._placements) > 64:
                    self._placements.clear()
                old = self._placement[1] if self._placement is not None else None
                p = old.derive(key) if old is not None else rendezvous.Placement(key)
                self._placements[key] = p
            self._placement = (self.roster.version, p)
        return self._placement[1]

    def owner(self, cid: bytes) -> str | None:
        return self.current().owner(cid)

    def owns(self, cid: bytes) -> bool:
        me = self.roster.self_name
        return me is not None and self.owner(cid) == me

    async def refresh(self) -> None:
        """Resolve the list again and take it (a DNS name that fails keeps its last answer)."""
        listed: dict[str, str] = {n: "static" for n in self.static}
        for entry in self.dns:
            host, _, port = entry.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host.strip("[]"), int(port), type=socket.SOCK_STREAM
                )
            except (OSError, UnicodeError, ValueError) as e:
                log.warning("peers: cannot resolve %s (%s); keeping its last answer", entry, e)
            else:
                self._resolved[entry] = {_name(str(i[4][0]), int(port)) for i in infos}
            for n in self._resolved.get(entry, ()):
                listed.setdefault(n, "dns")
        now = self.clock()
        added, removed = self.roster.update(listed, now)
        for n in added:
            if self.port and _is_local(n, self.port):
                self.roster.mark_self(n, now)
        if added or removed:
            log.info("peers: %d listed (+%d, -%d)", len(listed), len(added), len(removed))
            self._wake.set()
        self.client.name = self.roster.self_name or ""

    async def probe(self, m: Member) -> None:
        m.probed_at = self.clock()
        challenge = secrets.token_hex(16)
        self._challenges[challenge] = None
        ours: tuple[str, int] | None = None
        secret = self.client.secret
        try:
            doc, ours = await self.client.health(m.name, challenge)
        except PeerFailure as e:
            if e.kind in ("failed", "missing", "busy"):
                # A health answer that is none (not HTTP, a 500, no such path): no peer there
                # now. Probed again after a backoff, not at once (and again, and again).
                self.roster.failed(m.name, self.clock(), e.message)
                self._wake.set()
            else:
                self.report(m.name, e)
                # refused a proof made with the secret a reload replaced while it was out
                # (rekeyed asked for a probe of it with the new one): probed again now, not
                # after the backoff the refusal set
                if e.kind == "rejected" and self.client.secret != secret:
                    self.roster.probe_soon(m.name)
                    self._wake.set()
            return
        except Exception:  # a supervision point: one member's answer must not end the loop
            log.exception("peers: probing %s failed", m.name)
            return
        finally:
            seen = self._challenges.pop(challenge)
        if seen is not None and seen == ours:  # our own server, asked on this very connection
            self.roster.mark_self(m.name, self.clock())
            self.client.name = m.name
            return
        node = doc.get("node")
        if node == self.client.node:
            log.warning(
                "peers: %s answered with this host's node id, but our probe never reached "
                "this host: another host (echoing us, or relaying our probe), not taken for us",
                m.name,
            )
            node = ""
        self.roster.answered(m.name, self.clock(), node if isinstance(node, str) else "")

    def reached(self, challenge: str, peer: object) -> None:
        """Our peer server was asked for its health with `challenge` on a connection from
        `peer` (its far end, as the socket gives it): where that is one of our probes' and
        `peer` an address of this host, the probe reached ourselves if `peer` is the probe's
        own end. A member that relays our probe to us asks on a connection of its own: from
        another port (of this host, or of another host, whose address is not ours)."""
        end = endpoint(peer)
        if challenge in self._challenges and end is not None and is_local_ip(end[0]):
            self._challenges[challenge] = end

    def rekeyed(self) -> None:
        """This host took a new cluster secret: the members that refused its proof (they
        took the new one first) are probed now, not when their backoff (up to a minute) runs
        out; each one that answers hears from us, and probes us in turn. Until then each host
        places chunks without the others, and reads their shares from the origin."""
        woken = False
        for m in list(self.roster.members.values()):
            if m.state is State.REJECTING:
                woken |= self.roster.probe_soon(m.name)
        if woken:
            self._wake.set()

    def heard_from(self, name: str, node: str) -> None:
        """A member asked us something with the cluster's proof: where we count it dead (or
        rejecting), it may be back. A host that starts probes every member, so the others
        probe it now (one probe at a time) rather than when their backoff runs out (they
        would place chunks differently meanwhile). Not taken for an answer itself: the name
        is the sender's to choose, and anyone with the secret could bring a member that is
        gone back into the placement, or forgive one its silent requests."""
        if node != self.client.node and self.roster.probe_soon(name):
            self._wake.set()

    def report(self, name: str, e: PeerFailure) -> None:
        """Act on a failed request to `name`."""
        now = self.clock()
        if e.kind == "dead":
            self.roster.failed(name, now, e.message)
            self._wake.set()  # probe it again when its backoff runs out
        elif e.kind == "rejected":
            self.roster.rejected(name, now, e.message)
            self._wake.set()
        elif e.kind == "stall" and self._cut_off(name, now):
            pass
        elif e.kind in ("stall", "corrupt"):
            if self.roster.strike(name, now, e.message):
                self.client.stats.strikes[e.kind] += 1
                log.warning("peers: struck %s: %s", name, e.message)
        elif e.kind == "silent":  # took a pull-through, sent nothing: once, a slow origin's
            if self.roster.silent_pull(name, now, e.message):
                self.client.stats.strikes[e.kind] += 1
                log.warning(
                    "peers: struck %s: %s (%d times in a row)", name, e.message, SILENT_STRIKE
                )
        elif e.kind == "self":
            # Our own server says so to a request from our node id; anyone else can say it
            # too. A probe settles it (Membership.probe), asked again at most every
            # SELF_REPROBE: a self-probe that once stalled is settled by the next one.
            if self.roster.reprobe(name, now):
                self._wake.set()
        elif e.kind in ("missing", "busy"):
            self.roster.answered(name, now)  # a proper answer: it is up
        # "failed" (it broke off, or its own pull failed) says nothing either way: a peer
        # that is gone is found by the next request, which cannot connect. (A "silent" one is
        # not asked again for the same chunk: that cost a second pull wait.)

    def _cut_off(self, name: str, now: float) -> bool:
        """`name` stalled on us: whether every other member that was live (two at least) has
        too, within CUT_OFF_WINDOW timeouts. Then it is this host that is cut off (a link, a
        switch port), not each of them stalling: they are counted dead, not struck, so the
        first probe that gets through once the network heals has them back, where strikes
        kept this host on the origin for 30 s (the others strike it, as before: to them it
        is one member that stalled)."""
        stalled = self.roster.members.get(name)
        if stalled is None or stalled.state is not State.LIVE:
            # A request that went out before it was counted dead or struck (many are in
            # flight at once): nothing new. One counted dead stays dead, probed, not struck
            # for it; and it is no live member's stall (every live one "stalled", once
            # none is left live, would bring back members struck for their own)
            return stalled is not None and stalled.state is State.DEAD
        window = CUT_OFF_WINDOW * self.client.timeout
        self._stalled[name] = now
        self._stalled = {n: t for n, t in self._stalled.items() if now - t <= window}
        members = self.roster.members
        live = {n for n, m in members.items() if m.state is State.LIVE}
        # (those struck meanwhile stalled too: they count; the dead and rejecting do not)
        others = live | (self._stalled.keys() & members.keys())
        if len(others) < 2 or not live <= self._stalled.keys():
            return False
        if now - self._cut_at <= STRIKE_MAX and all(
            members[n].served_at <= self._cut_at for n in others
        ):
            # Every one came back at a probe since the last cut-off, and stalled again before
            # serving a chunk: what gets through is probes, not chunks (a link that drops
            # big packets; members whose disks hang). Struck, each strike longer, not probed
            # back every second or two for a timeout's stall each time.
            return False
        log.warning(
            "peers: every peer stalled on us within %.0f s: this host is cut off from them, "
            "most likely; they are counted dead, and probed, until they answer",
            window,
        )
        for n in others:
            self.roster.failed(n, now, "stalled, as every peer did: this host cut off")
        self._stalled.clear()
        self._cut_at = now
        self._wake.set()
        return True

    async def run(self) -> None:
        """Keep the roster current until cancelled."""
        next_refresh = 0.0
        while True:
            now = self.clock()
            if now >= next_refresh:
                try:
                    await self.refresh()
                except Exception:  # a supervision point: membership must outlive a bad round
                    log.exception("peers: refreshing the member list failed; trying again")
                next_refresh = now + self.dns_refresh
            # Cleared before the round, not after: a wake while it is out (a reload's new
            # secret, a member heard from, one probed next: the round waits for a dead one's
            # timeout) is for the next round, not lost until a backoff runs out
            self._wake.clear()
            due = self.roster.due(self.clock())
            for at in range(0, len(due), 64):  # 64 probes at a time
                async with asyncio.TaskGroup() as tg:
                    for m in due[at : at + 64]:
                        tg.create_task(self.probe(m))
            wake_at = min(next_refresh, self.roster.next_due() or next_refresh)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, wake_at - self.clock())):
                    await self._wake.wait()

    def to_json(self) -> list[dict[str, Any]]:
        return self.roster.to_json(self.clock())


def _name(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _is_local(name: str, port: int) -> bool:
    """Whether `name` ("ip:port") is an address of this host with our peer port (a name,
    not an address, is left to the probe)."""
    host, _, p = name.rpartition(":")
    return p.isdigit() and int(p) == port and is_local_ip(host.strip("[]"))


def endpoint(addr: object) -> tuple[str, int] | None:
    """A socket's address as (IP, port), an IPv4 address seen as IPv6 as its IPv4 one, so
    that the two ends of one connection compare equal; None for anything else."""
    if not isinstance(addr, tuple) or len(addr) < 2 or not isinstance(addr[1], int):
        return None
    try:
        ip = ipaddress.ip_address(str(addr[0]))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), addr[1]


def is_local_ip(text: str) -> bool:
    """Whether `text` is an IP address of this host (in this network namespace): binding a
    socket to an address succeeds only where the address is. An IPv4 address seen as
    IPv6 (`::ffff:10.0.0.1`, on a dual-stack listener) is its IPv4 one."""
    try:
        ip = ipaddress.ip_address(text)  # (a scope, "fe80::1%eth0", is kept: bound with it)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return False
    try:
        family, kind, _, _, where = socket.getaddrinfo(
            str(ip), 0, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
        )[0]
        with socket.socket(family, kind) as s:
            s.bind(where)
    except OSError:  # (socket.gaierror too)
        return False
    return True


class RangeProbe(Protocol):
    """What PeerSource asks of the origin (origin.Origin): whether it answers ranges."""

    @property
    def ignores_ranges(self) -> bool: ...

    async def answers_ranges(self, pack: bytes) -> bool: ...


class _HaveAsk:
    """The ids to ask one member about in the next `have` request, and its answer: the ids
    it holds, None if the request failed."""

    __slots__ = ("ids", "said")

    def __init__(self, said: asyncio.Future[set[bytes] | None]) -> None:
        self.ids: set[bytes] = set()
        self.said = said


class PeerSource:
    """A ChunkSource: the chunk's owner, then peers that hold it (see the module docstring)."""

    name = "peer"

    def __init__(
        self,
        membership: Membership,
        client: PeerClient,
        hedge_after: float,
        rng: random.Random | None = None,
        busy_wait: float | None = None,
        origin: RangeProbe | None = None,
    ) -> None:
        self.membership = membership
        self.origin = origin
        self.client = client
        self.hedge_after = hedge_after
        # how long peers answering busy are asked again before the origin is: as long as an
        # owner's pull through its origin may take
        self.busy_wait = client.pull_wait if busy_wait is None else busy_wait
        self.rng = rng or random.Random()
        self._have: dict[tuple[str, bytes], tuple[float, bool]] = {}
        # Members busy to every chunk asked of them (since, last), none served (_waits_on)
        self._busy_since: dict[str, tuple[float, float]] = {}
        # Members that stayed busy to every chunk past a whole busy wait, serving none: later
        # they are waited on SPENT_BUSY_WAIT at most, until they serve one
        self._spent: set[str] = set()
        # Requests in flight to each member, each set once it said it will serve (200): a
        # member sending us a chunk, or pulling one through for us, is not busy to everything
        self._taking: dict[str, set[asyncio.Event]] = {}
        # `have` asks by member: the ids asked for the next request, and the task that sends
        # them, one request at a time (_has)
        self._asking: dict[str, _HaveAsk] = {}
        self._sending: dict[str, _HaveAsk] = {}  # the request out to each member
        self._asker: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"PeerSource({self.membership!r}, hedge_after={self.hedge_after})"

    def owner_key(self, chunk: Chunk) -> bytes:
        """What the chunk's owner is found by: its id; or, where the origin answers no
        ranges, its pack's. There an owner's pull-through reads the whole pack (one GET,
        wholepacks.Taps, that every chunk of it is cut from), so one owner per pack pulls it
        through once for all of its chunks, instead of every owner of one of them reading
        the pack again (the fleet's egress times the chunks in a pack)."""
        p = chunk.packed
        if p is None or p.length == p.pack_size or self.origin is None:
            return chunk.id
        return p.pack if self.origin.ignores_ranges else chunk.id

    async def get(self, chunk: Chunk) -> memoryview:
        """The owner first, then holders; when every one of them was only busy, wait a little
        (jittered, doubling) and ask again: the holders multiply as the chunk spreads, and
        the origin is for when the peers cannot serve it, not for when they are busy."""
        problems: list[str] = []
        failed: set[str] = set()  # asked, and it will not serve this chunk
        hint: list[str] = []
        started = self.membership.clock()
        moves = 0
        retried = False
        p = chunk.packed
        if p is not None and p.length < p.pack_size and self.origin is not None:
            await self.origin.answers_ranges(p.pack)  # asked once; then owner_key knows
        key = self.owner_key(chunk)
        if key != chunk.id and (got := await self._own_owner(chunk, key, problems, hint)):
            return got

        def refused(name: str, e: PeerFailure) -> bool:
            """`name` did not serve the chunk: noted; whether its answer is worth waiting for
            (busy: see _waits_on). Any other answer rules it out for this chunk."""
            problems.append(e.message)
            hint.extend(e.holders)
            if e.kind != "busy":
                failed.add(name)
            return self._waits_on(name, e)

        for attempt in itertools.count():
            busy = False
            owner = self.membership.owner(key)
            skip = set(failed)
            if owner is not None and owner != self.membership.roster.self_name:
                skip.add(owner)
                if owner not in failed:
                    try:
                        return await self._owner(owner, chunk, skip)
                    except PeerFailure as e:
                        busy |= refused(owner, e)
                        # Gone from the placement (dead, struck, rejecting): the member ranked
                        # next owns the chunk now, for every host that saw the same, and
                        # pulls it through once. Ask it, not the origin.
                        if self.membership.owner(key) not in (owner, None) and moves < 3:
                            moves += 1
                            continue
                        # It broke off (going away, or its pull failed): once more, which
                        # either gets the chunk or finds it gone and moves the placement.
                        if e.kind == "failed" and not retried:
                            retried = True
                            failed.discard(owner)
                            continue
            deputy = self._deputy(key, owner, failed) if owner in failed else None
            if deputy is not None:
                # The owner is live but will not serve it (its own origin fails, or it lacks
                # the chunk and pulls nothing): the member ranked next pulls it through, once
                # for every host that saw the same, rather than each of them reading the
                # owner's share from the origin (one such host in a fleet of a hundred would
                # double the bucket's egress).
                skip.add(deputy)
                try:
                    return await self._fetch(deputy, chunk, "owner")
                except PeerFailure as e:
                    busy |= refused(deputy, e)
            queue = await self._holders(chunk, skip, hint)
            tries = 0
            while queue and tries < HOLDER_TRIES:
                name = queue.pop(0)
                skip.add(name)
                tries += 1
                try:
                    return await self._fetch(name, chunk, "holder")
                except PeerFailure as e:
                    busy |= refused(name, e)
                    # a busy holder names the hosts it served: ask them next (members only,
                    # as _holders keeps them: a name is the answer's to choose, any host,
                    # port and path)
                    members = self.membership.current().members
                    me = self.membership.roster.self_name
                    queue[:0] = [
                        h
                        for h in dict.fromkeys(e.holders)
                        if h in members and h != me and h not in skip and h not in queue
                    ]
            if not busy or self.membership.clock() - started > self.busy_wait:
                break
            self.client.stats.busy_waits += 1
            await asyncio.sleep(
                min(BUSY_WAIT_MAX, BUSY_WAIT_BASE * 2**attempt) * self.rng.uniform(0.5, 1.5)
            )
            hint = [h for h in dict.fromkeys(hint) if h not in failed][-16:]
        why = "; ".join(problems[-4:]) if problems else "no live peer holds it"
        raise ChunkMissing(f"chunk {chunk.id.hex()}: {why}")

    def _deputy(self, key: bytes, owner: str | None, failed: set[str]) -> str | None:
        """The member ranked next after the owner for `key`, that has not failed this chunk
        (every host that saw the owner fail finds the same one); None where that is this
        host (it reads the chunk from the origin itself, and serves the others' pulls from
        the same flight), or there is none. One deputy only: past it, the origin."""
        ranked = self.membership.current().rank(key)
        if len(ranked) < 2 or ranked[0] != owner:
            return None
        n = ranked[1]
        return None if n == self.membership.roster.self_name or n in failed else n

    def _waits_on(self, name: str, e: PeerFailure) -> bool:
        """Whether `name`'s answer is worth asking again for: a busy one, unless `name` has
        been busy to every chunk asked of it for longer than the busy wait, and served none
        meanwhile. Busy is no fault (an owner pulling through a fleet's scale-up says it),
        but a member that says it holds every chunk (`have`) and answers each busy cost
        every chunk the whole wait, for ever; now the wait once."""
        if e.kind != "busy":
            return False
        now = self.membership.clock()
        since, last = self._busy_since.get(name, (now, now))
        # busy anew: not asked meanwhile, or sending us one now (busy with us, not to all)
        serving = any(said.is_set() for said in self._taking.get(name, ()))
        if now - last > self.busy_wait or serving:
            since = now
        if len(self._busy_since) > 4 * HAVE_FANOUT * HOLDER_TRIES:  # (members come and go)
            self._busy_since = {
                n: t for n, t in self._busy_since.items() if now - t[1] <= self.busy_wait
            }
        self._busy_since[name] = (since, now)
        # One that was busy to everything for a whole wait before, serving nothing, is
        # waited on briefly when it is busy anew (after an idle spell): else a member stuck
        # busy (its upload slots held for ever, or a liar) cost every restore after each
        # idle minute the whole wait again, on every host
        wait = min(self.busy_wait, SPENT_BUSY_WAIT) if name in self._spent else self.busy_wait
        if now - since <= wait:
            return True
        if len(self._spent) >= 4 * HAVE_FANOUT * HOLDER_TRIES:  # (members come and go)
            self._spent &= self.membership.current().members
        if len(self._spent) < 4 * HAVE_FANOUT * HOLDER_TRIES:
            self._spent.add(name)
        return False

    async def _own_owner(
        self, chunk: Chunk, key: bytes, problems: list[str], hint: list[str]
    ) -> memoryview | None:
        """Where a chunk's owner is its pack's (owner_key), first ask the owner its own id
        gives for it as held (pull=0), which fails fast while it lacks it: once the fleet
        holds the pack, its chunks are served by as many hosts as they have owners, not
        all by the pack's."""
        mine = self.membership.owner(chunk.id)
        if mine in (None, self.membership.roster.self_name, self.membership.owner(key)):
            return None
        assert mine is not None
        try:
            return await self._fetch(mine, chunk, "holder")
        except PeerFailure as e:
            problems.append(e.message)
            hint += e.holders
            return None

    async def _fetch(self, name: str, chunk: Chunk, role: str) -> memoryview:
        data, how = await self._served(name, chunk, role)
        self._count(role, how, data)
        return data

    async def _served(
        self, name: str, chunk: Chunk, role: str, answered: asyncio.Event | None = None
    ) -> tuple[memoryview, str]:
        """The chunk from `name`, and how it served it; not counted as got (see _count)."""
        said = answered if answered is not None else asyncio.Event()
        taking = self._taking.setdefault(name, set())
        taking.add(said)
        try:
            data, how = await self.client.chunk(name, chunk, role == "owner", said)
        except PeerFailure as e:
            self.membership.report(name, e)
            raise
        finally:
            taking.discard(said)
            if not taking and self._taking.get(name) is taking:
                del self._taking[name]
        self._busy_since.pop(name, None)
        self._spent.discard(name)
        self.membership.roster.answered(name, self.membership.clock(), served=True)
        return data, how

    def _count(self, role: str, how: str, data: memoryview) -> None:
        """A chunk got from a peer and used: the bytes the origin was spared. Only the winner
        of a hedged race counts: both racers can end in one turn of the loop."""
        self.client.stats.chunks[(role, how)] += 1
        self.client.stats.bytes[(role, how)] += len(data)

    async def _owner(self, owner: str, chunk: Chunk, tried: set[str]) -> memoryview:
        """Ask the owner. If it has not begun to answer within `hedge_after` (its status
        line: an owner pulling from its origin answers at once, so a slow origin is not a slow
        owner), race holders of the chunk against it, one at a time, until one serves it.
        Every racer left is cancelled and awaited on every exit, its outcome retrieved."""
        answered = asyncio.Event()
        first = asyncio.ensure_future(self._served(owner, chunk, "owner", answered))
        racers: set[asyncio.Future[tuple[memoryview, str]]] = {first}
        failure: PeerFailure | None = None
        try:
            waiter = asyncio.ensure_future(answered.wait())
            try:
                await asyncio.wait(
                    {first, waiter}, timeout=self.hedge_after, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
            if not first.done() and not answered.is_set():
                # Look for a holder while the owner goes on: it may answer meanwhile.
                lookup = asyncio.ensure_future(self._holders(chunk, tried, []))
                try:
                    await asyncio.wait({first, lookup}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not lookup.done():
                        lookup.cancel()
                    await asyncio.gather(lookup, return_exceptions=True)
                holders = lookup.result() if not lookup.cancelled() else []
                if holders and not first.done():
                    tried.add(holders[0])
                    self.client.stats.hedges["started"] += 1
                    racers.add(asyncio.ensure_future(self._served(holders[0], chunk, "holder")))
            while racers:
                done, racers = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
                won: tuple[memoryview, str] | None = None
                # the owner's answer first where both came in one turn (no hedge won then)
                for t in sorted(done, key=lambda t: t is not first):
                    exc = t.exception()  # retrieved for every racer that ended
                    if exc is None:
                        if won is None:
                            won = t.result()
                            role = "owner" if t is first else "holder"
                            self._count(role, won[1], won[0])
                            if t is not first:
                                self.client.stats.hedges["won"] += 1
                    elif isinstance(exc, PeerFailure):
                        if t is first or failure is None:
                            failure = exc
                    else:
                        raise exc
                if won is not None:
                    return won[0]
            assert failure is not None
            raise failure
        finally:
            for t in racers:
                t.cancel()
            if racers:
                await asyncio.gather(*racers, return_exceptions=True)

    async def _holders(self, chunk: Chunk, tried: set[str], hint: list[str]) -> list[str]:
        """Peers that say they hold the chunk, best first: the owner's hint, then the peers
        ranked next for the chunk that answer `have` with it (asked at once, answers cached)."""
        placement = self.membership.current()
        me = self.membership.roster.self_name
        out = [
            h for h in dict.fromkeys(hint) if h in placement.members and h not in tried and h != me
        ]
        ranked: list[str] = []
        for n in placement.rank(chunk.id):
            if n != me and n not in tried and n not in out:
                ranked.append(n)
                if len(ranked) == HAVE_FANOUT:
                    break
        answers = await asyncio.gather(*(self._has(n, chunk.id) for n in ranked))
        out += [n for n, yes in zip(ranked, answers, strict=True) if yes]
        return out

    async def _has(self, name: str, cid: bytes) -> bool:
        """Whether `name` says it holds `cid`. The asks for one member wait for one request at
        a time, each with every id asked by then: a restore's fetches ask for many chunks at
        once, and a request each went past what a member reads of one host's unproven bodies
        at a time (its busy answers read as "no": a host joining a fleet that held every
        chunk read its own share from the origin)."""
        now = self.membership.clock()
        cached = self._have.get((name, cid))
        if cached is not None and now - cached[0] < HAVE_TTL:
            return cached[1]
        ask = self._sending.get(name)
        if ask is None or cid not in ask.ids:  # (else the request out has it: its answer)
            ask = self._asking.get(name)
            if ask is None:
                ask = self._asking[name] = _HaveAsk(asyncio.get_running_loop().create_future())
            ask.ids.add(cid)
        if name not in self._asker:
            self._asker[name] = asyncio.ensure_future(self._ask_have(name))
        said = await asyncio.shield(ask.said)
        return said is not None and cid in said

    async def _ask_have(self, name: str) -> None:
        """Send `name` the ids asked of it, a request at a time, until none are waiting; each
        ask hears the set it holds (None: the request failed, or this task was cancelled).
        It leaves `_asker` in the same step as it finds nothing more to ask: an ask made
        after that starts another."""
        try:
            await asyncio.sleep(0)  # the asks of this turn of the loop go together
            while (ask := self._asking.pop(name, None)) is not None:
                self._sending[name] = ask
                ids = list(ask.ids)
                got: set[bytes] = set()
                try:
                    for at in range(0, len(ids), MAX_HAVE_IDS):
                        got |= await self.client.have(name, ids[at : at + MAX_HAVE_IDS])
                except PeerFailure as e:
                    self.membership.report(name, e)
                    ask.said.set_result(None)
                    # One the failure put out of the placement (dead, struck, rejecting) is
                    # not asked again for the asks made meanwhile: they waited for this
                    # request, and another to it would cost them a timeout more
                    out = name not in self.membership.current().members
                    if out and (left := self._asking.pop(name, None)) is not None:
                        left.said.set_result(None)
                    continue
                except Exception as e:  # (a fault of ours: its askers raise it, as before)
                    ask.said.set_exception(e)
                    continue
                except BaseException:
                    ask.said.set_result(None)
                    raise
                now = self.membership.clock()
                if len(self._have) > 100_000:
                    self._have.clear()
                for cid in ids:
                    self._have[(name, cid)] = (now, cid in got)
                ask.said.set_result(got)
        finally:
            del self._asker[name]
            self._sending.pop(name, None)
            left = self._asking.pop(name, None)  # (only where cancelled: nothing sends it)
            if left is not None:
                left.said.set_result(None)


def new_node_id() -> str:
    return os.urandom(8).hex()

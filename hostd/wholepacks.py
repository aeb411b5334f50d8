"""Packs from an origin that answers no ranges: each pack read whole, once.

A plain web server may answer a ranged GET with the whole object. origin.Origin finds that
out (the first such answer, or its one-byte probe) and then reads packs through here:

- `PackStream`: a restore's run from a pack's first byte (origin.PackRun), one GET of the
  pack streamed through, each piece assembled as asked. A fill cuts its spans at the packs'
  edges on such an origin (fill.Filler), so a pack of one file's chunks is one run and one
  GET, and memory holds a piece, not a pack. A run that starts further in (a file that
  reuses some of an older snapshot's pack) reads through `Taps`, so the rest of that pack's
  runs share one read.
- `Taps`: every other read of a range of a pack (an owner's pull-throughs for its peers, a
  window of small files' chunks): one GET of the pack whose body lands in one buffer as it
  comes (`_Tap`), each range waiting only for its own end and cut (copied) from it. A pack
  is kept while anyone reads it and for a grace after, so chunks asked one after another
  cost one GET; at most TAPS packs are held (their buffers are anonymous mappings, filled
  only as the body arrives); one nobody reads is dropped, and a read nobody waits for any
  more is stopped, when another pack needs its place or after TAP_IDLE.

A body that breaks off is asked again from the start (the bytes already had are skipped),
BREAKS times at most. Nothing here verifies: every caller checks each chunk against its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import mmap
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from hostd import fastget
from hostd.errors import ChunkCorrupt, HostdError, OriginError
from hostd.fastget import Broken

if TYPE_CHECKING:
    from obstore import GetResult

log = logging.getLogger(__name__)

T = TypeVar("T")

BREAKS = 2  # times a whole pack's body that broke off is asked again
PIECE = 1 << 20  # obstore's pieces of a body read whole
TAPS = 2  # packs held at once by Taps
TAP_GRACE = 1.0  # s a pack nobody reads is kept for its next reader before another takes its place
TAP_IDLE = 5.0  # s after which a pack nobody reads is dropped (its read stopped) anyway
MAX_WHOLE = 1 << 30  # the largest pack read whole (config's most for pack_size)


class Stats(Protocol):
    bytes_in: int
    requests_ok: int
    requests_retried: int


class Origin(Protocol):
    """What this module needs of origin.Origin."""

    @property
    def url(self) -> str: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def timeout(self) -> float: ...

    def limit(self, nbytes: int) -> float:
        """Seconds a transfer of `nbytes` may take (the timeout, then a minimum rate)."""
        ...

    def fast_whole(self, pack: bytes, size: int) -> fastget.Stream | None:
        """fastget's GET of the whole pack, where fastget takes this origin's reads."""
        ...

    def open_whole(self, pack: bytes, size: int) -> Awaitable[GetResult]:
        """One GET of a whole pack of `size` bytes (as its manifest says), through the
        origin's limits and retries; ChunkMissing, ChunkCorrupt (a stated size over
        `size`) or OriginError where it cannot."""
        ...


def _check_size(origin: Origin, pack: bytes, size: int) -> None:
    if size > MAX_WHOLE:
        raise OriginError(
            f"pack {pack.hex()} is {size} bytes, more than the {MAX_WHOLE} a pack is read "
            f"whole at, and origin {origin.url} answers no ranges"
        )


class _Body:
    """One whole-pack GET's pieces, each under the origin's timeout: through fastget where
    it takes the answer (each piece received straight into its buffer, a timeout a piece
    however long the body), else obstore's stream (whose client timeout covers the whole
    body). Broken where the body fails or ends early, ChunkCorrupt where it runs past
    `size`."""

    def __init__(self, origin: Origin, pack: bytes, size: int) -> None:
        self._origin = origin
        self._pack = pack
        self._size = size
        self._fast: fastget.Stream | None = None
        self._pieces: AsyncIterator[Any] | None = None
        self.got = 0

    async def open(self) -> None:
        o = self._origin
        fast = o.fast_whole(self._pack, self._size)
        if fast is not None:
            try:
                async with asyncio.timeout(o.timeout):
                    opened = await fast.open()
            except fastget.Oversized as e:
                fast.close()
                raise ChunkCorrupt(
                    f"pack {self._pack.hex()} at origin {o.url} {e}, more than the "
                    f"{self._size} bytes its manifest says"
                ) from None
            except TimeoutError:
                fast.close()
                raise Broken(f"no answer in {o.timeout:g} s") from None
            except BaseException:
                fast.close()
                raise
            if opened:
                o.stats.requests_ok += 1
                self._fast = fast
                return
            fast.close()
        result = await o.open_whole(self._pack, self._size)
        self._pieces = aiter(result.stream(min_chunk_size=PIECE))

    async def next(self) -> memoryview | None:
        """The next piece; None at the body's end."""
        o = self._origin
        seconds = o.limit(PIECE)
        try:
            async with asyncio.timeout(seconds):
                piece = await self._next()
        except TimeoutError:
            raise Broken(f"not {PIECE >> 10} KiB in {seconds:g} s") from None
        if piece is None:
            return None
        self.got += len(piece)
        o.stats.bytes_in += len(piece)
        if self.got > self._size:
            raise ChunkCorrupt(
                f"pack {self._pack.hex()} at origin {o.url} sent more than the {self._size} "
                "bytes its manifest says"
            )
        return piece

    async def _next(self) -> memoryview | None:
        if self._fast is not None:
            k = min(PIECE, self._fast.left)
            return await self._fast.read(k, _same) if k else None
        assert self._pieces is not None
        try:
            return memoryview(await anext(self._pieces))
        except StopAsyncIteration:
            return None
        except Exception as e:
            # (obstore's text, without its multi-line debug dump of the client's error)
            text = str(e).split("\n\nDebug source:", 1)[0].strip() or type(e).__name__
            raise Broken(f"receiving the body: {' '.join(text.split())}") from None

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self._pieces = None  # obstore drops the connection with the stream


def _same(piece: memoryview) -> memoryview:
    return piece


class PackStream:
    """`length` bytes from `offset` of a pack, read in order through one GET of the whole
    pack (the bytes before `offset` dropped as they come): origin.PackRun's stream for a
    server that answers no ranges. `read` raises Broken where the body fails or ends
    early (the run asks again), ChunkCorrupt where it runs past the pack's size."""

    def __init__(self, origin: Origin, pack: bytes, offset: int, length: int, size: int) -> None:
        self._body = _Body(origin, pack, size)
        self._origin = origin
        self._pack = pack
        self._skip = offset
        self._size = size
        self._rest = memoryview(b"")  # received, not handed out yet
        self.left = length  # of the run

    async def open(self) -> None:
        _check_size(self._origin, self._pack, self._size)
        await self._body.open()
        while self._skip:
            piece = await self._next()
            k = min(self._skip, len(piece))
            self._skip -= k
            self._rest = piece[k:]

    async def _next(self) -> memoryview:
        piece = await self._body.next()
        if piece is None:
            raise Broken(f"the body ended at byte {self._body.got}")
        return piece

    async def read(self, n: int, then: Callable[[memoryview], T]) -> T:
        buf = bytearray(n)
        have = 0
        while have < n:
            if not self._rest:
                self._rest = await self._next()
            k = min(n - have, len(self._rest))
            buf[have : have + k] = self._rest[:k]
            self._rest = self._rest[k:]
            have += k
        self.left -= n
        return await handed(then, memoryview(buf))

    def close(self) -> None:
        self._body.close()


class _Tap:
    """One GET of a whole pack, landing in one buffer as it comes; `cut` waits for the
    bytes of its range. Done (`done`) once the body ended, failed or was stopped; a
    failure is handed to every reader waiting and coming, each a fresh exception."""

    def __init__(self, origin: Origin, pack: bytes, size: int, on_done: Callable[[_Tap], None]):
        self._origin = origin
        self.key = (pack, size)
        self._buf: mmap.mmap | None = None  # mapped once the GET is answered
        self._got = 0  # bytes of the body in _buf
        self._moved = asyncio.Event()  # set (and replaced) as bytes arrive or it ends
        self._failure: Callable[[], Exception] | None = None
        self.done = False
        self.readers = 0  # in cut now
        self.used = asyncio.get_running_loop().time()  # when a reader last came or left
        self._on_done = on_done
        self._task: asyncio.Future[None] | None = asyncio.ensure_future(self._run())
        self._task.add_done_callback(self._ended)  # (also for a task cancelled before it ran)

    def __repr__(self) -> str:
        state = "failed" if self.failed else "done" if self.done else "reading"
        return f"_Tap({self.key[0].hex()}, {self._got}/{self.key[1]}, {state})"

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def opened(self) -> bool:
        """Whether its GET was answered within its size (its buffer mapped)."""
        return self._buf is not None

    async def cut(self, offset: int, length: int) -> memoryview:
        """A copy of `length` bytes at `offset`, once they are in (a view would keep the
        whole pack alive with a chunk); fewer where the body ended short of them."""
        end = offset + length
        while self._got < end:
            if self._failure is not None:
                raise self._failure()
            if self.done:  # shorter than its manifest says: the caller's length check
                end = max(offset, self._got)
                break
            await self._moved.wait()
        if self._buf is None:
            return memoryview(b"")
        with memoryview(self._buf) as whole:
            return memoryview(bytes(whole[offset:end]))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _wake(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    def _fail(self, kind: Callable[[str], Exception], message: str) -> None:
        self._failure = functools.partial(kind, message)

    async def _run(self) -> None:
        o = self._origin
        pack, size = self.key
        try:
            _check_size(o, pack, size)
            for attempt in itertools.count():
                try:
                    await self._read()
                except Broken as e:
                    if attempt >= BREAKS:
                        raise OriginError(
                            f"pack {pack.hex()} at origin {o.url} broke off {attempt + 1} "
                            f"times ({e}, at byte {self._got} of {size})"
                        ) from None
                    o.stats.requests_retried += 1
                    log.info(
                        "%s pack %s broke at byte %d (%s): asking again",
                        o.url,
                        pack.hex(),
                        self._got,
                        e,
                    )
                    continue
                if self._got < size:
                    # A whole answer shorter than the pack (a proxy's error page sent as a
                    # 200): failed, so the next reader asks again rather than being cut
                    # from it for as long as reads keep coming.
                    raise ChunkCorrupt(
                        f"pack {pack.hex()} at origin {o.url} is {self._got} bytes, shorter "
                        f"than the {size} bytes its manifest says"
                    )
                return
        except HostdError as e:  # ChunkMissing, ChunkCorrupt, OriginError
            self._fail(type(e), e.message)
        except Exception as e:  # not one of ours: still every reader's, named
            self._fail(OriginError, f"reading pack {pack.hex()} at origin {o.url}: {e!r}")

    async def _read(self) -> None:
        pack, size = self.key
        body = _Body(self._origin, pack, size)
        try:
            await body.open()
            if self._buf is None and size:
                self._buf = mmap.mmap(-1, size)  # pages come as the body fills them
            while (piece := await body.next()) is not None:
                start, end = body.got - len(piece), body.got
                if end > self._got:  # (a body asked again skips what the last one brought)
                    assert self._buf is not None
                    k = max(self._got - start, 0)
                    self._buf[start + k : end] = piece[k:]
                    self._got = end
                    self._wake()
        finally:
            body.close()

    def _ended(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() and self._failure is None:
            self._fail(OriginError, f"the read of pack {self.key[0].hex()} was stopped")
        elif not task.cancelled() and (e := task.exception()) is not None:  # (retrieved)
            self._fail(OriginError, f"reading pack {self.key[0].hex()}: {e!r}")
        self.done = True
        self._task = None  # (a cancelled task's traceback holds this tap: a cycle)
        self._wake()
        self._on_done(self)


class Taps:
    """The whole-pack reads an origin without ranges keeps for `cut` (see the module's
    docstring)."""

    def __init__(self, origin: Origin) -> None:
        self._origin = origin
        self._taps: OrderedDict[tuple[bytes, int], _Tap] = OrderedDict()
        self._moved = asyncio.Event()  # a tap ended or lost its last reader
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"Taps({list(self._taps.values())})"

    def __len__(self) -> int:
        return len(self._taps)

    def __contains__(self, key: object) -> bool:
        return key in self._taps

    def holds(self, pack: bytes, size: int) -> bool:
        """Whether the pack's whole read is held (under way or done, not failed): a run of
        it had best cut its pieces from there than read the pack again."""
        tap = self._taps.get((pack, size))
        return tap is not None and not tap.failed

    async def cut(self, pack: bytes, size: int, offset: int, length: int) -> memoryview:
        """A copy of `length` bytes at `offset` of the pack, from its whole read."""
        tap = await self._tap(pack, size, offset + length)
        tap.readers += 1
        try:
            return await tap.cut(offset, length)
        finally:
            tap.readers -= 1
            tap.used = asyncio.get_running_loop().time()
            if not tap.readers:
                self._changed()

    def close(self) -> None:
        self._closed = True
        for tap in self._taps.values():
            tap.stop()
        self._taps.clear()
        if self._expiry is not None:
            self._expiry.cancel()

    async def _tap(self, pack: bytes, size: int, end: int) -> _Tap:
        """The pack's tap: kept or under way, or a new one once fewer than TAPS are held
        (making room by dropping one nobody has read for TAP_GRACE, finished ones first,
        its read stopped if it was under way; with none such, waiting for one). A reader
        that has waited TAP_GRACE takes the place of a finished tap nobody is reading at
        that moment however recently it was read: packs read without a pause would
        otherwise keep a third one waiting for as long as they are asked for. A tap of
        the same pack opened under another size serves a range up to `end` within it: its
        answer stated no more than that size, so the pack is what it reads (the size is
        the asker's to state: a peer's pull names it, and each other size a whole read)."""
        key = (pack, size)
        loop = asyncio.get_running_loop()
        since = loop.time()
        while True:
            if self._closed:
                raise OriginError(f"origin {self._origin.url} is closed (get pack {pack.hex()})")
            tap = self._taps.get(key)
            if tap is None or tap.failed:
                tap = next(
                    (
                        t
                        for t in self._taps.values()
                        if t.key[0] == pack and t.opened and not t.failed and end <= t.key[1]
                    ),
                    tap,
                )
            if tap is not None and not tap.failed:
                key = tap.key
                self._taps.move_to_end(key)
                tap.used = loop.time()
                return tap
            self._taps.pop(key, None)
            if len(self._taps) >= TAPS:
                now = loop.time()
                starved = now - since >= TAP_GRACE
                idle = [
                    t
                    for t in self._taps.values()
                    if not t.readers and (t.used <= now - TAP_GRACE or (starved and t.done))
                ]
                if not idle:
                    # Woken when a tap ends or loses its last reader; or when one unread
                    # now has been for TAP_GRACE, or this reader has waited that long.
                    moved = self._moved
                    wake = [t.used + TAP_GRACE for t in self._taps.values() if not t.readers]
                    if not starved:
                        wake.append(since + TAP_GRACE)
                    until = min(wake, default=None)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(until):
                            await moved.wait()
                    continue
                self._drop(min(idle, key=lambda t: (not t.done, t.used)))
            tap = self._taps[key] = _Tap(self._origin, pack, size, self._ended)
            self._expire_later()
            return tap

    def _drop(self, tap: _Tap) -> None:
        if self._taps.get(tap.key) is tap:
            del self._taps[tap.key]
        if not tap.done:
            tap.stop()

    def _ended(self, tap: _Tap) -> None:
        if tap.failed and self._taps.get(tap.key) is tap:
            del self._taps[tap.key]  # the next reader asks again
        self._changed()

    def _changed(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    def _expire_later(self) -> None:
        if self._expiry is None and self._taps and not self._closed:
            self._expiry = asyncio.get_running_loop().call_later(TAP_IDLE, self._expire)

    def _expire(self) -> None:
        """Drop the taps nobody has read for TAP_IDLE (stopping reads nobody waits for)."""
        self._expiry = None
        cutoff = asyncio.get_running_loop().time() - TAP_IDLE
        for tap in [t for t in self._taps.values() if not t.readers and t.used <= cutoff]:
            self._drop(tap)
        self._changed()
        self._expire_later()


# A piece this small is handed to `then` on the loop (a thread hop costs more).
INLINE_THEN = 256 * 1024


async def handed(then: Callable[[memoryview], T], data: memoryview) -> T:
    """`then(data)`: on the loop for a small piece, else on a thread."""
    return then(data) if len(data) <= INLINE_THEN else await asyncio.to_thread(then, data)

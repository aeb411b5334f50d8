"""Packs at publish: many chunks' stored bytes in one origin object (FORMAT.md, "Packs").

Small files' chunks are collected by the publish (`PackUpload`, `PackChunks`), which
names each pack as a chunk is named (BLAKE3 of its bytes); a large file's are packed on its
ingest thread as they are read (`FilePacks`), in file order and back to back, into packs of
up to `pack_size`, under a byte budget per publish (`PackBudget`) that keeps what the packs
hold bounded: being filled, sealed and queued, being uploaded.
"""

from __future__ import annotations

import io
import threading
from array import array
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import blake3

from hostd.core import codec
from hostd.core import manifest as mf

T = TypeVar("T")


class Run(Protocol):
    """What FilePacks needs of the publish it packs for (publish._Run)."""

    budget: PackBudget
    pack_size: int
    min_saving: float

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T: ...

    async def claim(self, cid: bytes) -> bool: ...

    async def sealed(self, pack: LargePack) -> None: ...


class Stopped(Exception):
    """The publish was cancelled while its ingest thread waited to hand a chunk over (to
    the upload queue, or for room in the budget of packs held)."""


class PackChunks:
    """The chunks of a small files' pack: id -> (size, codec, offset, length), as columns. A
    pack of a chunk's size holds up to ~80,000 tiny files' chunks: a tuple and a dict entry
    each, made and let go in bulk among a publish's lasting objects, left the heap pinned."""

    __slots__ = ("_values", "ids")

    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self._values = array("q")  # (size, codec, offset, length) of each, in a row

    def __repr__(self) -> str:
        return f"PackChunks({len(self.ids)} chunks)"

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, cid: bytes, size: int, kind: int, offset: int, length: int) -> None:
        self.ids.append(cid)
        self._values.extend((size, kind, offset, length))

    def items(self) -> Iterator[tuple[bytes, tuple[int, int, int, int]]]:
        v = self._values
        for i, cid in enumerate(self.ids):
            yield cid, (v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3])


@dataclass(frozen=True, slots=True)
class PackUpload:
    """A sealed pack of small files' chunks, their stored bytes back to back: hashed on a
    thread by the uploader that takes it, which then records where each of `chunks` lies
    in it."""

    data: bytes
    chunks: PackChunks

    def __repr__(self) -> str:
        return f"PackUpload({len(self.chunks)} chunks, {len(self.data)} B)"


@dataclass(frozen=True, slots=True)
class LargePack:
    """A sealed pack of one large file's chunks, named and joined on its ingest thread as it
    was filled: the uploader that takes it PUTs it and gives its bytes back to the budget."""

    id: bytes
    data: bytes
    chunks: dict[bytes, tuple[int, int, int, int]]  # id -> (size, codec, offset, length)

    def __repr__(self) -> str:
        return f"LargePack({self.id.hex()[:12]}, {len(self.chunks)} chunks, {len(self.data)} B)"


class PackBudget:
    """The bytes of large files' packs a publish holds: being filled on the ingest threads,
    sealed and queued, being uploaded. An ingest thread takes a chunk's stored bytes before
    it adds them to a pack, waiting while they would pass `total` (backpressure on the
    reading); an uploader gives a pack's bytes back once its PUT is done and it holds them
    no more. Takers are ingest threads, the giver is the loop (a lock, never held across
    anything slow).

    A waiting taker always gets its bytes in the end: what each ingest thread fills is at
    most a pack, its own included with the chunk it asks room for (a pack the chunk would
    overflow is sealed, and so on its way to the uploaders, first), and everything sealed
    is given back as the uploads finish. So `total` must be at least a pack per ingest
    thread (PACKS_HELD is twice that). A take of more than `total` is let through when
    nothing is held."""

    def __init__(self, total: int, cancel: threading.Event) -> None:
        self.total = total
        self.held = 0
        self.peak = 0  # the most held at once
        self.waiting = 0  # takers waiting for room now
        self._cancel = cancel
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return (
            f"PackBudget({self.held} of {self.total} bytes held, peak {self.peak}, "
            f"{self.waiting} waiting)"
        )

    def take(self, n: int) -> None:
        """On an ingest thread: hold `n` more bytes, waiting for room; Stopped once the
        publish is cancelled (`wake` tells a waiting taker)."""
        with self._cond:
            while not self._cancel.is_set() and self.held and self.held + n > self.total:
                self.waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self.waiting -= 1
            if self._cancel.is_set():
                raise Stopped()
            self.held += n
            self.peak = max(self.peak, self.held)

    def give(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake the takers waiting, to see that the publish was cancelled."""
        with self._cond:
            self._cond.notify_all()


def _hasher() -> Any:
    """A hasher for a large file's pack, fed a chunk at a time: on threads of blake3's own for
    a large chunk, as the chunk's own hash is."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


class FilePacks:
    """The packs of one large file, filled on its ingest thread (`add` is the handoff of
    `ingest`), in file order. Each chunk neither the ref's previous snapshot nor this run
    has stored is compressed where its file's codec says to try (kept raw where zstd saves
    too little), and its stored bytes are taken from the run's budget and appended to the
    pack being filled, which is hashed as it grows. A pack is sealed when the next chunk
    would take it past `pack_size` (a chunk larger than that gets a pack of its own) and
    when the file ends, and is handed to the uploaders; a chunk stored already is left out,
    to be pointed at where it is once everything is placed."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buf = io.BytesIO()  # getvalue() hands its buffer over: no copy of the pack
        self.hasher = _hasher()
        self.chunks: dict[bytes, tuple[int, int, int, int]] = {}  # as LargePack's
        self.held = 0  # bytes taken from the budget for the pack being filled

    def __repr__(self) -> str:
        return f"FilePacks({len(self.chunks)} chunks filling, {self.held} bytes)"

    def ingest(self, job: Callable[[], T]) -> T:
        """On an ingest thread: run `job` (`ingest` with `add` as its handoff), then seal
        the file's last pack. A file that fails gives back what its pack held."""
        try:
            got = job()
            self.seal()
            return got
        finally:
            self.run.budget.give(self.held)
            self.held = 0

    def add(self, chunk: mf.Chunk, data: memoryview) -> None:
        run = self.run
        if not run.on_loop(run.claim(chunk.id)):
            return
        kind: int = mf.CODEC_RAW
        stored: bytes | memoryview = data
        if chunk.codec == mf.CODEC_ZSTD:
            kind, stored = codec.choose(data, codec.compress(data), run.min_saving)
        n = len(stored)
        if self.chunks and self.buf.tell() + n > run.pack_size:
            self.seal()
        run.budget.take(n)
        self.held += n
        self.chunks[chunk.id] = (chunk.size, kind, self.buf.tell(), n)
        self.buf.write(stored)
        self.hasher.update(stored)

    def seal(self) -> None:
        """Name the pack being filled and hand it to the uploaders (waiting while the upload
        queue is full). Its bytes stay taken until its upload is done."""
        if not self.chunks:
            return
        pack = LargePack(self.hasher.digest(), self.buf.getvalue(), self.chunks)
        self.buf, self.hasher, self.chunks = io.BytesIO(), _hasher(), {}
        # The pack's bytes are the uploader's to give back from here; if it is never queued
        # (Stopped), the publish is over and its budget with it.
        self.held = 0
        self.run.on_loop(self.run.sealed(pack))

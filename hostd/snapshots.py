"""The snapshots this host knows: their records, pins, manifests and the chunk map.

A snapshot is remembered as a small record (`Snapshot`: id, last use, pin, sizes) in memory
and a row in the index; its manifest is a file under the manifests directory, decoded on
demand, the last few decoded kept (bounded in chunks). The chunk map (chunk id -> blob
digest, offset: where a local copy of a chunk may lie) is in the index, queried per chunk.
Pins are counted per blob, so whether a blob is pinned is one lookup.

A newly recorded snapshot is indexed (manifest file, chunk rows, blob list) by the index's
writer thread, so the loop pays for none of it, and its chunks are found once that is done
(until then a fill fetches them elsewhere, which is only slower). A small one is indexed at
once, on the loop, for what that costs is less than a thread hop. A load indexes whatever a
stopped daemon left unindexed.

Must not: decode or walk a big manifest on the loop; keep memory per chunk for a snapshot once
it is indexed; forget a snapshot a ref names, a pin holds or a running restore uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from hostd import memory
from hostd.core import manifest as mf
from hostd.errors import ManifestError
from hostd.index import Index, SnapshotRow, pack_blobs, unpack_blobs
from hostd.lock import private_dir

log = logging.getLogger(__name__)

# Decoded manifests kept for reuse: at most this many, holding at most DECODED_CHUNKS chunks
# in all (`_weight`: an entry without chunks, such as a directory or a meta pair, counts as
# one). A decoded file of one chunk costs ~650 bytes, so the bound is ~85 MB: room for a
# compile cache of 100,000 files, whose manifest takes ~2 s to decode (~20 us a file) and
# would otherwise be decoded again by every restore of it. A bigger one is decoded for each
# use.
DECODED_MANIFESTS = 8
DECODED_CHUNKS = 1 << 17

# A manifest of at most this many chunks is indexed on the loop when it is recorded (a
# millisecond or two), not by the writer thread.
SMALL_MANIFEST_CHUNKS = 512

# A manifest a publish built is kept decoded only up to this weight (a compile cache of ~30,000
# files; one this size decodes again in ~0.4 s). Its objects were made among the publish's
# short-lived ones: kept, a 100,000-file one held ~50 MB and pinned as much again of the heap
# they shared (pymalloc frees an arena only when all of it is free), the resting RSS of a
# daemon that publishes grew ~45 MB a publish of 100,000 files, and the next publish peaked
# on top (bench/RESULTS.md). One a restore asks for is decoded in one go on a thread, and
# kept then.
BUILT_KEPT_CHUNKS = 1 << 15


@dataclass(slots=True, eq=False)
class Snapshot:
    """What is remembered of a known snapshot; its manifest is decoded on demand."""

    id: str
    last_used: float
    pinned: bool
    chunk_size: int
    files: int
    bytes: int
    compat: Mapping[str, str]
    _store: Snapshots = field(repr=False)

    @property
    def manifest(self) -> mf.Manifest:
        """Its manifest: blocking when it is not among the last used (it is decoded from its
        file); on the loop, `await Snapshots.load_manifest(id)` decodes it in a thread."""
        return self._store.manifest(self.id)


@dataclass(slots=True)
class _Indexing:
    """A snapshot whose indexing the writer thread has not finished."""

    manifest: mf.Manifest
    job: Future[None]
    keep: bool = True  # False: a publish's own, too big to keep decoded (BUILT_KEPT_CHUNKS)


_SIZE = operator.attrgetter("size")
_CHUNKS = operator.attrgetter("chunks")
_PATH = operator.attrgetter("path")
_TARGET = operator.attrgetter("target")
# Characters of a manifest's strings (paths, link targets, compat and meta) that weigh as
# much as a chunk when it is kept decoded (`_weight`).
TEXT_PER_CHUNK = 256


def _weight(m: mf.Manifest) -> int:
    """What keeping a decoded manifest costs, in chunks: its chunks, one for each entry that
    has none (an empty file, a directory, a symlink, a compat or meta pair), and one for each
    TEXT_PER_CHUNK characters of its strings. Counting chunks alone, a manifest of millions
    of meta pairs, or of one 32 MiB meta value (a hostile origin's), weighed next to nothing
    and was kept until a restart. Without a Python frame per entry (this runs on the loop)."""
    per_file = list(map(len, map(_CHUNKS, m.files)))
    empty = per_file.count(0)
    text = (
        sum(map(len, map(_PATH, m.files)))
        + sum(map(len, m.dirs))
        + sum(map(len, map(_PATH, m.symlinks)))
        + sum(map(len, map(_TARGET, m.symlinks)))
        + sum(map(len, itertools.chain(m.compat, m.compat.values(), m.meta, m.meta.values())))
    )
    entries = empty + len(m.dirs) + len(m.symlinks) + len(m.compat) + len(m.meta)
    return sum(per_file) + entries + text // TEXT_PER_CHUNK


def _settle_on(loop: asyncio.AbstractEventLoop, store: Snapshots, _job: Future[None]) -> None:
    """`store._settle` on `loop`, asked from the index's writer thread (nothing once the loop
    is closed: a stopping daemon)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(store._settle)


def decode_manifest(
    data: bytes, *, keep_bytes: bool = False, expect_id: str | None = None
) -> mf.Manifest:
    """`mf.decode`, with the file digests computed too (blocking: in a thread), so that no
    later use computes them on the loop. `keep_bytes`: for a manifest to be written out;
    `expect_id`: the id its bytes must hash to, checked first."""
    m = mf.decode(data, keep_bytes=keep_bytes, expect_id=expect_id)
    m.blobs()
    memory.trim_for(len(m.files))  # (the decode's garbage: 15 MiB off a 100,000-file restore)
    return m


def chunk_rows(m: mf.Manifest) -> Iterator[tuple[bytes, bytes, int]]:
    """The chunk map entries of a manifest: (chunk id, blob digest, offset in the blob)."""
    for digest, f in m.blobs().items():
        for off, c in f.offsets(m.chunk_size):
            yield c.id, digest, off


class Snapshots:
    def __init__(
        self,
        index: Index,
        manifests_dir: Path,
        clock: Callable[[], float],
        *,
        decoded_chunks: int = DECODED_CHUNKS,
    ) -> None:
        self.index = index
        self.manifests_dir = manifests_dir
        self.clock = clock
        self.decoded_chunks = decoded_chunks
        self._records: dict[str, Snapshot] = {}
        self._pins: dict[bytes, int] = {}  # blob digest -> pinned snapshots that name it
        self._indexing: dict[str, _Indexing] = {}
        self._erasing: list[Future[None]] = []  # gc's jobs dropping forgotten snapshots' rows
        self._decoded: OrderedDict[str, tuple[mf.Manifest, int]] = OrderedDict()
        self._decoded_total = 0

    def __repr__(self) -> str:
        return (
            f"Snapshots({len(self._records)}, pinned blobs={len(self._pins)}, "
            f"indexing={len(self._indexing)}, decoded={len(self._decoded)})"
        )

    def __len__(self) -> int:
        return len(self._records)

    def get(self, snapshot_id: str) -> Snapshot | None:
        return self._records.get(snapshot_id)

    def all(self) -> list[Snapshot]:
        return list(self._records.values())

    # start-up ----------------------------------------------------------------------------
    def load(self) -> None:
        """Read the records, index what is not indexed yet (rows a version-2 index or a
        stopped daemon left; manifests found with no row, after an index loss), count the
        pins. Blocking."""
        private_dir(self.manifests_dir)
        for row in self.index.snapshots():
            if not row.indexed:
                m = self._unindexed(row.id)
                if m is None:
                    self.index.delete_snapshot(row.id)
                    continue
                row = self._summary(m, row.last_used, row.pinned)
                self._write_index(m, row)
            self._add(row)
        for p in self.manifests_dir.glob("*"):
            if p.suffix == ".tmp":  # a write cut short: its row, if any, is not indexed
                p.unlink(missing_ok=True)
            if p.name in self._records or len(p.name) != 64:
                continue
            with contextlib.suppress(ManifestError):
                m = self._read(p.name)
                row = self._summary(m, self.clock(), False)
                self.index.put_snapshot(row)
                self._write_index(m, row)
                self._add(row)
        for s in self._records.values():
            if s.pinned:
                for d in self._blobs_of(s.id):
                    self._pins[d] = self._pins.get(d, 0) + 1

    def _unindexed(self, snapshot_id: str) -> mf.Manifest | None:
        try:
            return self._read(snapshot_id)
        except ManifestError as e:
            legacy = self.index.legacy_manifest(snapshot_id)
            if not legacy:
                log.warning("dropping snapshot %s from the index: %s", snapshot_id, e)
                return None
        try:
            m = decode_manifest(legacy, keep_bytes=True)  # (written out as a file next)
        except ManifestError as e:
            log.warning("dropping unreadable snapshot %s from the index: %s", snapshot_id, e)
            return None
        return m if m.snapshot_id == snapshot_id else None

    def _add(self, row: SnapshotRow) -> Snapshot:
        s = Snapshot(
            row.id,
            row.last_used,
            row.pinned,
            row.chunk_size,
            row.files,
            row.bytes,
            row.compat,
            self,
        )
        self._records[row.id] = s
        return s

    @staticmethod
    def _summary(m: mf.Manifest, last_used: float, pinned: bool) -> SnapshotRow:
        size = sum(map(_SIZE, m.files))  # m.total_bytes, without a Python frame per file
        return SnapshotRow(
            m.snapshot_id,
            last_used,
            pinned,
            m.chunk_size,
            len(m.files),
            size,
            dict(m.compat),
            indexed=False,
        )

    def _write_index(self, m: mf.Manifest, row: SnapshotRow) -> None:
        """Keep the manifest's file and write its chunk rows and blob list (blocking: the
        writer thread, or a load)."""
        path = self.manifests_dir / m.snapshot_id
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(m.encoded)
            os.replace(tmp, path)
        # Written: a decoded manifest kept for reuse need not hold its bytes too (10 MB for
        # 100,000 files); they are read from the file, or encoded again, if ever asked for.
        m.__dict__.pop("encoded", None)
        blobs = pack_blobs((d, f.size) for d, f in m.blobs().items())
        self.index.index_snapshot(row, blobs, chunk_rows(m))

    # records ------------------------------------------------------------------------------
    def record(self, m: mf.Manifest, *, built: bool = False) -> Snapshot:
        """Remember a snapshot (or that it was used again). O(files) for a new one, with the
        indexing left to the writer thread. `built`: a publish's own (BUILT_KEPT_CHUNKS)."""
        now = self.clock()
        self._settle()
        s = self._records.get(m.snapshot_id)
        if s is not None:
            p = self._indexing.get(s.id)
            # (a tree published again; or a restore handed the publish's own copy while it is
            # being indexed: kept, it would pin the heap all the same)
            if (not built or _weight(m) <= BUILT_KEPT_CHUNKS) and not (
                p is not None and p.manifest is m and not p.keep
            ):
                self._remember(m)
            s.last_used = now
            self.index.touch_snapshot(s.id, now)
            return s
        n = _weight(m)
        keep = not built or n <= BUILT_KEPT_CHUNKS
        if keep:
            self._remember(m, n)
        row = self._summary(m, now, False)
        self.index.put_snapshot(row)
        s = self._add(row)
        self._erasing = [f for f in self._erasing if not f.done()]
        if n <= SMALL_MANIFEST_CHUNKS and not self._erasing:
            self._write_index(m, row)
        else:  # (after a gc's erasing too, which may be of this very snapshot's rows)
            job = self.index.later(self._write_index, m, row)
            self._indexing[s.id] = _Indexing(m, job, keep)
            # Let go of the manifest once it is indexed, not at the next call: that may be a
            # publish's, whose garbage it would then be freed among.
            with contextlib.suppress(RuntimeError):  # (no loop runs: settled at the next call)
                job.add_done_callback(
                    functools.partial(_settle_on, asyncio.get_running_loop(), self)
                )
        return s

    def set_pinned(self, snapshot_id: str, pinned: bool) -> list[bytes]:
        """Pin or unpin a known snapshot; returns the blobs no pin holds any more."""
        s = self._records[snapshot_id]
        self.index.set_pinned(snapshot_id, pinned)
        if s.pinned == pinned:
            return []
        s.pinned = pinned
        released: list[bytes] = []
        for d in self._blobs_of(snapshot_id):
            n = self._pins.get(d, 0) + (1 if pinned else -1)
            if n > 0:
                self._pins[d] = n
            else:
                self._pins.pop(d, None)
                released.append(d)
        return released

    def pinned(self, digest: bytes) -> bool:
        return digest in self._pins

    def pinned_blobs(self) -> set[bytes]:
        return set(self._pins)

    def _settle(self) -> None:
        """Let go of the in-memory state of snapshots the writer has indexed."""
        for sid in [s for s, p in self._indexing.items() if p.job.done()]:
            if self._indexing[sid].job.exception() is None:
                del self._indexing[sid]

    def _blobs_of(self, snapshot_id: str) -> list[bytes]:
        """The distinct blobs a snapshot names (blocking for a big one: an index read)."""
        self._settle()
        p = self._indexing.get(snapshot_id)
        if p is not None:
            return list(p.manifest.blobs())
        packed = self.index.snapshot_blobs(snapshot_id)
        return [d for d, _ in unpack_blobs(packed)] if packed is not None else []

    def blob_sizes(self, snapshot_id: str) -> list[tuple[bytes, int]]:
        """(digest, size) of each distinct blob a snapshot names. Blocking: call it in a
        thread (it reads the index)."""
        p = self._indexing.get(snapshot_id)
        if p is not None:
            return [(d, f.size) for d, f in p.manifest.blobs().items()]
        packed = self.index.snapshot_blobs(snapshot_id)
        return list(unpack_blobs(packed)) if packed is not None else []

    def locations(self, cid: bytes) -> list[tuple[bytes, int]]:
        """(blob digest, offset) of each blob an indexed snapshot has holding chunk `cid`."""
        return self.index.chunk_locations(cid)

    def have_locations(self, cids: Sequence[bytes]) -> dict[bytes, list[bytes]]:
        """The blobs the chunk map names for each of `cids` (blocking: call it in a thread)."""
        return self.index.chunk_blobs(cids)

    # manifests ----------------------------------------------------------------------------
    def _read(self, snapshot_id: str) -> mf.Manifest:
        """Decode a snapshot's manifest file (blocking); ManifestError if it cannot be."""
        try:
            data = (self.manifests_dir / snapshot_id).read_bytes()
        except OSError as e:
            raise ManifestError(f"manifest {snapshot_id}: cannot read its file: {e}") from e
        m = decode_manifest(data)
        if m.snapshot_id != snapshot_id:
            raise ManifestError(f"manifest file {snapshot_id} does not hash to its name")
        return m

    def _kept(self, snapshot_id: str) -> mf.Manifest | None:
        got = self._decoded.get(snapshot_id)
        if got is not None:
            self._decoded.move_to_end(snapshot_id)
            return got[0]
        p = self._indexing.get(snapshot_id)
        return p.manifest if p is not None else None

    def _remember(self, m: mf.Manifest, n: int | None = None) -> None:
        """Keep a decoded manifest (of weight `n`, if known) among the last used."""
        sid = m.snapshot_id
        if sid in self._decoded:
            self._decoded.move_to_end(sid)
            return
        if n is None:
            n = _weight(m)
        if n > self.decoded_chunks:
            return
        self._decoded[sid] = (m, n)
        self._decoded_total += n
        while self._decoded_total > self.decoded_chunks or len(self._decoded) > DECODED_MANIFESTS:
            _, (_, k) = self._decoded.popitem(last=False)
            self._decoded_total -= k

    def manifest(self, snapshot_id: str) -> mf.Manifest:
        """A known snapshot's manifest. Blocking when it is not among the last used: on the
        loop, prefer load_manifest. KeyError if unknown, ManifestError if unreadable."""
        if snapshot_id not in self._records:
            raise KeyError(snapshot_id)
        m = self._kept(snapshot_id)
        if m is None:
            m = self._read(snapshot_id)
            self._remember(m)
        return m

    async def load_manifest(self, snapshot_id: str) -> mf.Manifest | None:
        """A known snapshot's manifest, decoded in a thread if need be. None if the snapshot
        is unknown, or its manifest file is unreadable (then it is forgotten: its ref
        resolves it again)."""
        if snapshot_id not in self._records:
            return None
        m = self._kept(snapshot_id)
        if m is not None:
            return m
        try:
            m = await asyncio.to_thread(self._read, snapshot_id)
        except ManifestError as e:
            s = self._records.get(snapshot_id)
            log.warning("snapshot %s: %s", snapshot_id, e.message)
            if s is not None and not s.pinned and snapshot_id not in self._indexing:
                self._forget(snapshot_id)  # its ref resolves it again, from the origin
            return None
        if snapshot_id in self._records:
            self._remember(m)
        return m

    # forgetting ---------------------------------------------------------------------------
    def _forget(self, snapshot_id: str) -> None:
        """Forget an unpinned snapshot's record and row (not its chunk rows: see _erase)."""
        del self._records[snapshot_id]
        self._indexing.pop(snapshot_id, None)
        if (got := self._decoded.pop(snapshot_id, None)) is not None:
            self._decoded_total -= got[1]
        self.index.delete_snapshot(snapshot_id)

    async def forget_unnamed(self, in_use: Callable[[Collection[bytes]], bool]) -> list[str]:
        """Forget the snapshots no ref names and no pin holds, except those a running
        operation uses (`in_use` of their blobs); then drop their chunk rows (those of blobs
        no other snapshot names) and their manifest files. Returns the ids forgotten."""
        # Listed by the writer, after what it has queued: every recorded snapshot is indexed.
        listed = await asyncio.wrap_future(self.index.later(self._unnamed))
        self._settle()
        forgot: list[str] = []
        for sid, digests in listed:
            s = self._records.get(sid)
            # Checked again on the loop, with no await from here to the forget: a restore
            # that took it up since holds its blobs, a pin or a new ref shows.
            if (
                s is None
                or s.pinned
                or sid in self._indexing
                or in_use(digests)
                or self.index.refs_of(sid)
            ):
                continue
            self._forget(sid)
            forgot.append(sid)
        await self._erase_all(forgot)
        return forgot

    async def forget(
        self, ids: Collection[str], in_use: Callable[[Collection[bytes]], bool]
    ) -> tuple[list[str], list[str]]:
        """Forget these snapshots (`rm`, `prune`), named by a ref or not, except pinned ones
        and those a running operation uses; then drop their chunk rows and manifest files as
        forget_unnamed does. Returns (forgotten, left because in use)."""
        # Listed by the writer, after what it has queued: every recorded snapshot is indexed.
        listed = await asyncio.wrap_future(self.index.later(self._listed, list(ids)))
        self._settle()
        forgot: list[str] = []
        busy: list[str] = []
        for sid, digests in listed:
            s = self._records.get(sid)
            if s is None or s.pinned:
                continue
            if sid in self._indexing or in_use(digests):  # checked with no await before _forget
                busy.append(sid)
                continue
            self._forget(sid)
            forgot.append(sid)
        await self._erase_all(forgot)
        return forgot, busy

    async def _erase_all(self, forgot: list[str]) -> None:
        """Drop forgotten snapshots' chunk rows and manifest files, on the index's writer.
        Recording one of them again queues its indexing after this (see record)."""
        if forgot:
            erasing = self.index.later(self._erase, forgot)
            self._erasing.append(erasing)
            await asyncio.wrap_future(erasing)

    def _listed(self, ids: Iterable[str]) -> list[tuple[str, list[bytes]]]:
        return [
            (sid, [d for d, _ in unpack_blobs(self.index.snapshot_blobs(sid) or b"")])
            for sid in ids
        ]

    def _unnamed(self) -> list[tuple[str, list[bytes]]]:
        return [
            (sid, [d for d, _ in unpack_blobs(self.index.snapshot_blobs(sid) or b"")])
            for sid in self.index.unnamed_snapshots()
        ]

    def _erase(self, forgot: Iterable[str]) -> None:
        """Drop forgotten snapshots' chunk rows (of blobs no known snapshot names) and their
        manifest files. Blocking: the writer thread."""
        named = self._named()
        for sid in forgot:
            path = self.manifests_dir / sid
            try:
                m = self._read(sid)
            except ManifestError as e:  # its rows stay: they name blobs that gc removes
                log.warning("forgotten snapshot %s: its chunk rows stay: %s", sid, e.message)
            else:
                self.index.drop_chunks((cid, d) for cid, d, _ in chunk_rows(m) if d not in named)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _named(self) -> set[bytes]:
        return {
            d for _, _, packed in self.index.all_snapshot_blobs() for d, _ in unpack_blobs(packed)
        }

    async def named_blobs(self) -> set[bytes]:
        """Every blob a known snapshot names (computed by the writer, after what it has
        queued), with those of snapshots recorded since."""
        named = await asyncio.wrap_future(self.index.later(self._named))
        self._settle()
        for p in self._indexing.values():
            named.update(p.manifest.blobs())
        return named

    def chunk_sizes(self, digests: Collection[bytes]) -> dict[bytes, int]:
        """The chunk size a known snapshot gives each of `digests` (blocking)."""
        out: dict[bytes, int] = {}
        if digests:
            for _, cs, packed in self.index.all_snapshot_blobs():
                for d, _ in unpack_blobs(packed):
                    if d in digests:
                        out.setdefault(d, cs)
        return out

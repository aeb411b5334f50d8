"""Publish: a directory -> chunks and blobs -> origin -> manifest -> ref.

Each file is read once: its chunks are hashed and written into a scratch blob in the first
tier with room (so a later restore on this host is a cache hit), and the blob is renamed to
its digest when the file is done. Uploads run beside the hashing of the next file, bounded,
skipping chunks the origin already has. Whether a file's chunks are stored zstd is decided
from a trial on a few of them (weights barely compress; caches and images do).

Symlinks that stay inside the tree are kept; one that leaves it is stored as the file it
points to. Other special files are refused by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from hostd.cache import Cache
from hostd.core import codec, compat
from hostd.core import manifest as mf
from hostd.core.ids import compat_digest, file_digest
from hostd.errors import ManifestError, UsageError, first_error
from hostd.origin import Origin, validate_ref
from hostd.restore import Progress
from hostd.tier import BLOB_MODE, BlobStat, Tier, pread_exact, pread_into, pwrite_all, tier_error

INGEST_THREADS = 2


@dataclass(frozen=True)
class PublishRequest:
    path: Path
    ref: str
    facts: Sequence[str] | None = None
    compat: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    chunk_size: int | None = None


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str  # in the manifest
    source: str  # on disk
    mode: int
    size: int


@dataclass
class Tree:
    files: list[SourceFile] = field(default_factory=list)
    symlinks: list[mf.Symlink] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)


def scan_tree(root: Path) -> Tree:
    """Walk a directory to publish (blocking). Raises UsageError naming what cannot be kept."""
    if not root.is_absolute():
        raise UsageError(f"publish path {str(root)!r} is not absolute")
    if not root.is_dir():
        raise UsageError(f"publish path {str(root)!r} is not a directory")
    real_root = os.path.realpath(root)
    tree = Tree()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        entries = sorted(dirnames + filenames)
        if not entries and rel_dir:
            tree.dirs.append(rel_dir)
        for name in entries:
            full = os.path.join(dirpath, name)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            _check_name(rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                _add_symlink(tree, root, real_root, full, rel)
            elif stat.S_ISREG(st.st_mode):
                tree.files.append(SourceFile(rel, full, st.st_mode & 0o777, st.st_size))
            elif not stat.S_ISDIR(st.st_mode):
                raise UsageError(f"{rel!r} is not a regular file, directory or symlink")
    tree.files.sort(key=lambda f: f.path)
    return tree


def _raise(e: OSError) -> None:
    raise UsageError(f"cannot read {e.filename!r}: {e.strerror}") from e


def _check_name(rel: str) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"file name {rel!r} is not valid UTF-8") from e


def _add_symlink(tree: Tree, root: Path, real_root: str, full: str, rel: str) -> None:
    target = os.readlink(full)
    try:
        mf.check_symlink_target(rel, target)
        tree.symlinks.append(mf.Symlink(rel, target))
        return
    except ManifestError:
        pass
    real = os.path.realpath(full)
    inside = real == real_root or real.startswith(real_root + os.sep)
    if inside:  # stays inside, but not in normal form: point at the same place, normalized
        normal = os.path.relpath(real, os.path.realpath(os.path.dirname(full)))
        try:
            mf.check_symlink_target(rel, normal)
        except ManifestError as e:
            raise UsageError(f"symlink {rel!r} -> {target!r} cannot be kept: {e.message}") from e
        tree.symlinks.append(mf.Symlink(rel, normal))
        return
    try:
        st = os.stat(real)
    except OSError as e:
        raise UsageError(
            f"symlink {rel!r} points outside the tree to {target!r}, which is missing"
        ) from e
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"symlink {rel!r} points outside the tree to {real!r}, not a regular file")
    tree.files.append(SourceFile(rel, real, st.st_mode & 0o777, st.st_size))


@dataclass
class Ingested:
    ids: list[tuple[bytes, int]]  # (chunk id, size), in file order
    codec: int  # what this file's chunks are offered to the origin as
    blob: BlobStat | None  # the blob stored in the tier (None: no tier had room)


Handoff = Callable[[mf.Chunk, bytes], None]


class Stopped(Exception):
    """The publish was cancelled while its ingest thread waited to hand a chunk over."""


def decide_codec(fd: int, size: int, chunk_size: int, mode: str, min_saving: float) -> int:
    """Trial-compress a window of the first, middle and last chunks (blocking)."""
    if mode == "never":
        return mf.CODEC_RAW
    if mode == "always":
        return mf.CODEC_ZSTD
    raw: list[int] = []
    packed: list[int] = []
    for i in codec.sample_indexes(-(-size // chunk_size)):
        window = pread_exact(fd, min(codec.SAMPLE_WINDOW, size - i * chunk_size), i * chunk_size)
        raw.append(len(window))
        packed.append(len(codec.compress(window)))
    return mf.CODEC_ZSTD if codec.worth_compressing(raw, packed, min_saving) else mf.CODEC_RAW


def ingest(
    src: str,
    size: int,
    chunk_size: int,
    *,
    tier: Tier | None,
    scratch: Path | None,
    compress: str,
    min_saving: float,
    handoff: Handoff,
) -> Ingested:
    """Read a file once (blocking): hash each chunk, copy it into a scratch blob, and hand a
    copy of its bytes to the uploaders, so what is uploaded is exactly what was hashed. The
    scratch blob is installed in the tier under its digest at the end."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    out = -1
    try:
        kind = decide_codec(fd, size, chunk_size, compress, min_saving)
        if scratch is not None:
            out = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        ids: list[tuple[bytes, int]] = []
        buf = bytearray(min(chunk_size, max(size, 1)))
        for off in range(0, size, chunk_size):
            n = min(chunk_size, size - off)
            view = memoryview(buf)[:n]
            try:
                pread_into(fd, view, off)
            except EOFError as e:
                raise UsageError(f"{src!r} shrank while it was being published") from e
            cid = blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest()
            ids.append((cid, n))
            if out >= 0:
                pwrite_all(out, view, off)
            handoff(mf.Chunk(cid, n, kind), bytes(view))
        if os.fstat(fd).st_size != size:
            raise UsageError(f"{src!r} changed size while it was being published")
        blob = None
        if out >= 0 and tier is not None and scratch is not None:
            os.fsync(out)
            os.fchmod(out, BLOB_MODE)
            os.close(out)
            out = -1
            blob = tier.install(scratch, file_digest(ids))
        return Ingested(ids, kind, blob)
    except BaseException:
        if scratch is not None:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
        raise
    finally:
        os.close(fd)
        if out >= 0:
            os.close(out)


class Publisher:
    def __init__(
        self,
        cache: Cache,
        origin: Origin,
        *,
        chunk_size: int,
        compress: str,
        min_saving: float,
        upload_concurrency: int,
        compat_facts: Sequence[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.origin = origin
        self.chunk_size = chunk_size
        self.compress = compress
        self.min_saving = min_saving
        self.upload_concurrency = upload_concurrency
        self.compat_facts = tuple(compat_facts)
        self.clock = clock
        # Reading and hashing the tree gets threads of its own: in the shared pool it would
        # queue behind the uploads' chunk reads and leave the origin waiting for work.
        self.ingest_pool = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="hostd-ingest")

    def close(self) -> None:
        self.ingest_pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"Publisher({self.origin.url}, chunk_size={self.chunk_size}, compress={self.compress})"
        )

    async def publish(self, req: PublishRequest, progress: Progress) -> dict[str, Any]:
        t0 = self.clock()
        validate_ref(req.ref)
        cs = req.chunk_size or self.chunk_size
        progress.phase = "hash"
        tree = await asyncio.to_thread(scan_tree, req.path)
        progress.total_files = len(tree.files)
        progress.fill.total_bytes = sum(f.size for f in tree.files)
        facts = compat.publish_facts(req.facts, self.compat_facts, req.compat)
        run = _Run(self, cs, progress)
        entries = await run.all(tree.files)
        t1 = self.clock()
        m = mf.build(
            chunk_size=cs,
            files=entries,
            symlinks=tree.symlinks,
            dirs=tree.dirs,
            compat=facts,
            meta=req.meta,
        )
        progress.phase = "upload"
        await self.origin.put_manifest(m.snapshot_id, m.encoded)
        digest = compat_digest(facts)
        await self.origin.put_ref(req.ref, digest, m.snapshot_id)
        self.cache.record_snapshot(m)
        self.cache.index.put_ref(req.ref, digest, m.snapshot_id, time.time())
        t2 = self.clock()
        return {
            "snapshot": m.snapshot_id,
            "ref": req.ref,
            "compat": facts,
            "files": len(m.files),
            "symlinks": len(m.symlinks),
            "chunks": m.chunk_count,
            "bytes": m.total_bytes,
            "new_chunks": run.new_chunks,
            "compressed_chunks": run.compressed,
            "stored_bytes": run.stored_bytes,
            "cached": run.cached,
            "timings": {"hash": t1 - t0, "commit": t2 - t1, "total": t2 - t0},
        }


class _Run:
    """One publish: files ingested one after another on the ingest pool, their chunks handed
    through a bounded queue to upload workers. The queue bounds the memory a publish holds."""

    def __init__(self, p: Publisher, chunk_size: int, progress: Progress) -> None:
        self.p = p
        self.cs = chunk_size
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[mf.Chunk, bytes] | None] = asyncio.Queue(
            maxsize=2 * p.upload_concurrency
        )
        self.seen: set[bytes] = set()
        self.new_chunks = 0
        self.compressed = 0
        self.stored_bytes = 0
        self.cached = 0
        self.cancel = threading.Event()

    async def all(self, files: Sequence[SourceFile]) -> list[mf.FileEntry]:
        out: list[mf.FileEntry] = []
        try:
            async with asyncio.TaskGroup() as tg:
                workers = [
                    tg.create_task(self.uploader()) for _ in range(self.p.upload_concurrency)
                ]
                # INGEST_THREADS files at once: with many small files, one at a time would
                # leave the ingest thread idle for a loop round trip between files.
                slots = asyncio.Semaphore(INGEST_THREADS)

                async def one(f: SourceFile) -> mf.FileEntry:
                    async with slots:
                        return await self.file(f)

                jobs = [tg.create_task(one(f)) for f in files]
                out = [await j for j in jobs]
                for _ in workers:
                    await self.queue.put(None)
        except BaseException as exc:
            self.cancel.set()  # an ingest thread waiting to hand a chunk over gives up
            err = first_error(exc)
            if err is not None and not isinstance(exc, asyncio.CancelledError):
                raise err from None
            raise
        return out

    def handoff(self, chunk: mf.Chunk, data: bytes) -> None:
        """Called on the ingest thread: queue a chunk for upload, waiting while the queue is
        full (backpressure), and giving up when the publish is cancelled."""
        fut = asyncio.run_coroutine_threadsafe(self.queue.put((chunk, data)), self.loop)
        while True:
            try:
                fut.result(timeout=0.1)
                return
            except FutureTimeout:
                if self.cancel.is_set():
                    fut.cancel()
                    raise Stopped() from None

    async def file(self, f: SourceFile) -> mf.FileEntry:
        if f.size == 0:
            self.progress.done_files += 1
            return mf.FileEntry(f.path, f.mode, 0, ())
        tier = await self.p.cache.reserve(f.size, self.p.cache.tiers)
        scratch = tier.tmp_dir / f"publish-{os.getpid()}-{id(f)}" if tier else None
        try:
            got = await self.loop.run_in_executor(
                self.p.ingest_pool,
                functools.partial(
                    ingest,
                    f.source,
                    f.size,
                    self.cs,
                    tier=tier,
                    scratch=scratch,
                    compress=self.p.compress,
                    min_saving=self.p.min_saving,
                    handoff=self.handoff,
                ),
            )
        except OSError as e:
            if tier is not None and scratch is not None and e.filename in (None, str(scratch)):
                raise tier_error(tier.name, scratch, e, "storing a published blob") from e
            raise UsageError(f"cannot read {f.path!r}: {e.strerror}") from e
        finally:
            if tier is not None:
                self.p.cache.unreserve(tier, f.size)
        if tier is not None and got.blob is not None:
            self.p.cache.adopt(tier, got.blob, self.cs)
            self.cached += 1
        self.progress.done_files += 1
        self.progress.fill.done_bytes += f.size
        chunks = tuple(mf.Chunk(cid, n, got.codec) for cid, n in got.ids)
        return mf.FileEntry(f.path, f.mode, f.size, chunks)

    async def uploader(self) -> None:
        while (item := await self.queue.get()) is not None:
            c, data = item
            if c.id in self.seen:
                continue
            self.seen.add(c.id)
            if await self.p.origin.has_chunk(c.id):
                continue
            stored: bytes = data
            if c.codec == mf.CODEC_ZSTD:
                packed = await asyncio.to_thread(codec.compress, data)
                kind, chosen = codec.choose(data, packed, self.p.min_saving)
                stored = bytes(chosen)
                if kind == mf.CODEC_ZSTD:
                    self.compressed += 1
            await self.p.origin.put_chunk(c.id, stored)
            self.new_chunks += 1
            self.stored_bytes += len(stored)

"""Publish: a directory -> chunks and blobs -> origin -> manifest -> ref.

Each file is read once: its chunks are hashed and written into a scratch blob in the first
tier with room (so a later restore on this host is a cache hit), and the blob is renamed to
its digest when the file is done. Uploads run beside the hashing of the next file, bounded,
skipping chunks the origin already has. Whether a file's chunks are stored zstd is decided
from a trial on a few of them (weights barely compress; caches and images do).

Where chunks go at the origin: small files' chunks (one chunk, smaller than the chunk size)
into packs of up to a chunk's size, in path order; a large file's, with `pack_size` set,
into packs of that file of up to `pack_size`, in file order, so a restore reads many of them
with one ranged GET; with `pack_size` 0, each into an object of its own. The bytes of large
files' packs a publish holds (being filled, queued, being uploaded) are bounded (`PackBudget`).

The source is read with the caller's rights, in its mount namespace, by descriptor: the
helper of asuser.py walks it and opens each file for us, so a file the caller cannot read
cannot be published, and a caller swapping files or symlinks under a running publish gets an
error, never another file's bytes. Symlinks that stay inside the tree are kept; one that
leaves it is stored as the file it points to (followed in the caller's root, with its
rights). Other special files are refused by name, never opened.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import logging
import os
import posixpath
import threading
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import blake3

from hostd import fastcopy, memory
from hostd.asuser import AsUser, Spawner, Storage
from hostd.cache import Cache
from hostd.caller import Caller
from hostd.core import codec, compat
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id, compat_digest, file_digest
from hostd.core.select import shrink_refusal
from hostd.errors import (
    FULL,
    HostdError,
    ManifestError,
    NotFound,
    OriginError,
    TierError,
    UsageError,
    first_error,
)
from hostd.fsops import FILE_COLUMNS, NUMBER_COLUMNS, unrecordable_mtime
from hostd.origin import Origin, validate_ref
from hostd.packs import (
    FilePacks,
    LargePack,
    PackBudget,
    PackChunks,
    PackUpload,
    Stopped,
)
from hostd.refs import RefLog
from hostd.restore import Progress, Resolver
from hostd.tier import (
    BLOB_MODE,
    BlobStat,
    Tier,
    blob_mode,
    pread_exact,
    pread_into,
    pwrite_all,
    tier_error,
)

log = logging.getLogger(__name__)

INGEST_THREADS = 2

# The bytes of large files' packs one publish holds at once (`PackBudget`), in packs of
# `pack_size`: one being filled on each ingest thread, and as many again sealed, queued or
# being uploaded side by side. (At least INGEST_THREADS packs in any case: each ingest thread
# may hold a whole pack while it waits for room.) A larger budget would let more PUTs run at
# once, at pack_size of memory each.
PACKS_HELD = 2 * INGEST_THREADS

T = TypeVar("T")


@dataclass(frozen=True)
class PublishRequest:
    path: Path
    ref: str
    caller: Caller  # whose rights read the source, in whose mount namespace
    facts: Sequence[str] | None = None  # the compat fact names; None: the kind's
    kind: str = compat.DEFAULT_KIND
    compat: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    chunk_size: int | None = None
    pidfd: int = -1  # the caller's process, from the connection (SO_PEERPIDFD); not owned
    include: Sequence[str] = ()  # patterns, core/pathfilter.py
    exclude: Sequence[str] = ()
    force: bool = False  # move the ref even to an empty or much smaller tree


@dataclass(frozen=True, slots=True)
class SourceFile:
    path: str  # in the manifest
    mode: int
    size: int
    ident: tuple[int, int]  # (dev, ino) the scan saw: the file opened later must be it
    via: str | None = None  # a symlink's target outside the tree, in the caller's view
    mtime: int = 0  # ns, as the scan saw it; the one recorded is taken when it is read
    # ns, as the scan saw it: nobody can set a ctime back, so a file rewritten in place with
    # its size and mtime put back (rsync --inplace -t, touch -d) still shows its change
    ctime: int = 0


class Files:
    """The regular files a scan found, as columns (a path list, number arrays): a publish of
    100,000 files holds no object per file but its path until it reads it (a SourceFile,
    made on demand, shares the path): 48 bytes of numbers a file, where SourceFiles of the
    JSON's ints took ~300 beside the path."""

    __slots__ = ("ctime", "dev", "ino", "mode", "mtime", "paths", "size", "via")

    def __init__(
        self, paths: list[str] | None = None, numbers: Mapping[str, array[int]] | None = None
    ) -> None:
        n = numbers or {k: array(code) for k, code in NUMBER_COLUMNS.items()}
        self.paths = paths if paths is not None else []
        self.mode, self.size, self.mtime = n["mode"], n["size"], n["mtime"]
        self.ctime, self.dev, self.ino = n["ctime"], n["dev"], n["ino"]
        self.via: dict[int, str] = {}  # a symlink's target outside the tree, by index

    def __repr__(self) -> str:
        return f"Files({len(self.paths)} files)"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> SourceFile:
        return SourceFile(
            self.paths[i],
            self.mode[i],
            self.size[i],
            (self.dev[i], self.ino[i]),
            self.via.get(i),
            self.mtime[i],
            self.ctime[i],
        )

    def __iter__(self) -> Iterator[SourceFile]:
        return map(self.__getitem__, range(len(self.paths)))

    def append(self, f: SourceFile) -> None:
        values = (f.mode, f.size, f.mtime, f.ctime, *f.ident)
        columns = (self.mode, self.size, self.mtime, self.ctime, self.dev, self.ino)
        if not (
            0 <= f.mode <= 0o777
            and all(0 <= n <= 0xFFFF_FFFF_FFFF_FFFF for n in (f.size, *f.ident))
            and all(mf.MIN_MTIME <= n <= mf.MAX_MTIME for n in (f.mtime, f.ctime))
        ):
            raise HostdError(f"hostd's helper answered {f.path!r} with a field out of range")
        if f.via is not None:
            self.via[len(self.paths)] = f.via
        self.paths.append(f.path)
        for column, value in zip(columns, values, strict=True):
            column.append(value)

    def sort(self) -> None:
        """In path order."""
        order = sorted(range(len(self.paths)), key=self.paths.__getitem__)
        self.paths = [self.paths[i] for i in order]
        for name in NUMBER_COLUMNS:
            column = getattr(self, name)
            setattr(self, name, array(column.typecode, map(column.__getitem__, order)))
        if self.via:
            at = {old: new for new, old in enumerate(order) if old in self.via}
            self.via = {at[i]: v for i, v in self.via.items()}

    def clear(self) -> None:
        self.paths = []
        for name in NUMBER_COLUMNS:
            setattr(self, name, array(getattr(self, name).typecode))
        self.via = {}


@dataclass
class Tree:
    files: Files = field(default_factory=Files)
    symlinks: list[mf.Symlink] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, kind}, never opened


def scan_tree(
    fs: AsUser,
    root: Path,
    storage: Storage,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Tree:
    """Walk a directory to publish with the caller's rights (blocking; the helper walks by
    descriptor and opens nothing but directories), keeping what the filters keep. A FIFO,
    socket or device (or a symlink out of the tree to one) is skipped, never opened, and
    listed in `skipped`; raises UsageError naming anything else that cannot be kept."""
    if not root.is_absolute():
        raise UsageError(f"publish path {str(root)!r} is not absolute")
    chain = fs.source(str(root))
    storage.check(f"publish path {str(root)!r}", chain, chain[0])
    got = fs.scan(include, exclude)
    tree = Tree(
        files=_sources(got["files"]),
        dirs=list(got["dirs"]),
        skipped=[{"path": str(e["path"]), "kind": str(e["kind"])} for e in got["skipped"]],
    )
    for link in got["symlinks"]:
        _add_symlink(tree, str(link["path"]), str(link["target"]), link["resolved"])
    tree.files.sort()
    del got
    memory.trim_for(len(tree.files))  # (the scan's answer, decoded, is garbage now)
    return tree


def _sources(columns: Mapping[str, Any]) -> Files:
    """The files of a scan's answer, given as columns (fsops.FILE_COLUMNS: the paths a list,
    each number column the base64 of an array of NUMBER_COLUMNS' type)."""
    if not isinstance(columns, Mapping) or not all(k in columns for k in FILE_COLUMNS):
        raise HostdError("hostd's helper answered a scan without its files' columns")
    paths = columns["path"]
    if type(paths) is not list or not all(type(p) is str for p in paths):
        raise HostdError("hostd's helper answered a scan with a file's path not a string")
    numbers = {}
    for name, code in NUMBER_COLUMNS.items():
        numbers[name] = column = array(code)
        text = columns[name]
        try:
            if type(text) is not str:
                raise ValueError(name)
            column.frombytes(base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error):
            raise HostdError(
                f"hostd's helper answered a scan with its {name!r} column not an array"
            ) from None
        if len(column) != len(paths):
            raise HostdError("hostd's helper answered a scan with columns of different lengths")
    if paths and max(numbers["mode"]) > 0o777:
        raise HostdError("hostd's helper answered a scan with a file's mode out of range")
    return Files(paths, numbers)


def _source(f: Mapping[str, Any]) -> SourceFile:
    try:
        return _source_of(f)
    except (KeyError, TypeError, ValueError):
        raise HostdError("hostd's helper answered a symlinked file's fields malformed") from None


def _source_of(f: Mapping[str, Any]) -> SourceFile:
    d, i = f["id"]
    return SourceFile(
        str(f["path"]),
        int(f["mode"]),
        int(f["size"]),
        (int(d), int(i)),
        f["via"],
        recordable_mtime(str(f["path"]), int(f["mtime"])),
        min(max(int(f["ctime"]), mf.MIN_MTIME), mf.MAX_MTIME),  # (only compared)
    )


def recordable_mtime(path: str, ns: int) -> int:
    """`ns`, if a manifest can record it (FORMAT.md section 4: a signed 64-bit count of
    nanoseconds, the years 1677 to 2262); else UsageError naming the file (ext4 holds
    mtimes to 2446)."""
    if not mf.MIN_MTIME <= ns <= mf.MAX_MTIME:
        raise UsageError(unrecordable_mtime(path, ns))
    return ns


SAME, CHANGED, UNCLEAR = "same", "changed", "unclear"
CONFIRM_TRIES = 3  # reads again of a file whose link count moved with its ctime


def _change(a: os.stat_result, b: os.stat_result, size: int) -> str:
    """What two stats of one open file of `size` bytes say of the time between them: SAME
    (size, mtime and the ctime, which a write moves whatever is done to the mtime
    afterwards, as they were), CHANGED, or UNCLEAR: the link count moved, and a link or an
    unlink of another of its names moves the ctime too (a tree restored by link shares its
    inodes with the cache and other trees), so a moved ctime may be a write or not."""
    if (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns) or b.st_size != size:
        return CHANGED
    if a.st_ctime_ns == b.st_ctime_ns:
        return SAME
    return UNCLEAR if a.st_nlink != b.st_nlink else CHANGED


def _changed(path: str) -> UsageError:
    return UsageError(f"{path!r} changed while it was being published")


def _unclear(path: str) -> UsageError:
    return UsageError(
        f"{path!r}: its link count kept changing while it was being published (a tree being "
        "linked and unlinked), so whether it was written meanwhile cannot be told; publish "
        "it again"
    )


def _confirm(fd: int, src: str, size: int, chunk_size: int, ids: list[tuple[bytes, int]]) -> int:
    """A file read whole into `ids` under stats that cannot tell (UNCLEAR): read it again
    between two stats until they can, its chunks hashing as before; the mtime it has then.
    UsageError where it changed (or kept its link count moving, CONFIRM_TRIES times)."""
    buf = bytearray(min(chunk_size, max(size, 1)))
    for _ in range(CONFIRM_TRIES):
        before = os.fstat(fd)
        for (cid, n), off in zip(ids, range(0, size, chunk_size), strict=True):
            view = memoryview(buf)[:n]
            try:
                pread_into(fd, view, off)
            except EOFError as e:
                raise UsageError(f"{src!r} shrank while it was being published") from e
            if blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest() != cid:
                raise _changed(src)
        after = os.fstat(fd)
        seen = _change(before, after, size)
        if seen == SAME:
            return after.st_mtime_ns
        if seen == CHANGED:
            raise _changed(src)
    raise _unclear(src)


_SKIPPED_KINDS = frozenset({"FIFO", "socket", "device"})


def _add_symlink(tree: Tree, rel: str, target: str, resolved: Mapping[str, Any]) -> None:
    try:
        mf.check_symlink_target(rel, target)
        tree.symlinks.append(mf.Symlink(rel, target))
        return
    except ManifestError:
        pass
    kind = resolved["kind"]
    if kind == "inside":  # stays inside, but not in normal form: point at the same place
        normal = posixpath.relpath(str(resolved["rel"]) or ".", posixpath.dirname(rel) or ".")
        try:
            mf.check_symlink_target(rel, normal)
        except ManifestError as e:
            raise UsageError(f"symlink {rel!r} -> {target!r} cannot be kept: {e.message}") from e
        tree.symlinks.append(mf.Symlink(rel, normal))
    elif kind == "file":  # leaves the tree: stored as the file it points to
        tree.files.append(_source(resolved))
    elif kind == "missing":
        raise UsageError(f"symlink {rel!r} points outside the tree to {target!r}, which is missing")
    elif kind == "other" and resolved["type"] in _SKIPPED_KINDS:
        tree.skipped.append({"path": rel, "kind": f"symlink to a {resolved['type']}"})
    elif kind == "other":
        raise UsageError(
            f"symlink {rel!r} points outside the tree to {target!r}, a {resolved['type']}, "
            "not a regular file"
        )
    else:
        raise UsageError(
            f"symlink {rel!r} points outside the tree to {target!r}: {resolved.get('message')}"
        )


def _skipped_warning(entry: Mapping[str, str]) -> dict[str, str]:
    path, kind = entry["path"], entry["kind"]
    return {
        "warning": "skipped",
        "path": path,
        "kind": kind,
        "message": f"skipped {path!r}: a {kind}, not published (never opened)",
    }


def _no_gpu_warning(facts: Mapping[str, str]) -> dict[str, str]:
    unknown = ", ".join(k for k in sorted(facts) if k in compat.GPU_FACTS)
    return {
        "warning": "no_gpu_facts",
        "message": f"this host cannot tell its GPU facts ({unknown}: none; see hostd status), "
        "so the snapshot makes no GPU claim and every host restores it; give them with "
        "--compat if it depends on a GPU",
    }


@dataclass
class Ingested:
    ids: list[tuple[bytes, int]]  # (chunk id, size), in file order
    codec: int  # what this file's chunks are offered to the origin as
    blob: BlobStat | None  # the blob stored in the tier (None: no tier had room, or it had it)
    mtime: int  # ns, of the bytes that were read
    full: OSError | None = None  # why none was stored: the tier's filesystem filled up


class SmallFile(NamedTuple):
    """A file of one chunk, read whole: its chunk goes into a pack. (A tuple: ten thousand
    of them are made in a publish of a tree of small files, at a third of a dataclass's
    cost each.)"""

    cid: bytes
    size: int
    codec: int  # what `stored` is
    stored: bytes
    mtime: int
    blob: BlobStat | None


# A chunk and its bytes, handed over by `ingest`: the view is of its read buffer, valid only
# during the call (a handoff that keeps the bytes copies them).
Handoff = Callable[[mf.Chunk, memoryview], None]


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
    open_src: Callable[[], int],
    src: str,
    size: int,
    chunk_size: int,
    *,
    tier: Tier | None,
    scratch: Path | None,
    compress: str,
    min_saving: float,
    handoff: Handoff,
    mode: int = BLOB_MODE,
) -> Ingested:
    """Read a file once (blocking): hash each chunk, copy it into a scratch blob, and hand
    its bytes over (`handoff` copies them to the uploaders, or into a pack), so what is
    uploaded is exactly what was hashed. The scratch blob is installed in the tier under its
    digest at the end, of `mode` (tier.blob_mode of the file's). Caching is best effort: a
    tier whose filesystem fills up gets no blob (the scratch goes, `full` says why), and
    the file is published all the same."""
    fd = open_src()
    out = -1
    full: OSError | None = None

    def drop(e: OSError) -> None:  # the tier's filesystem is full: no blob
        nonlocal out, full
        if out >= 0:
            os.close(out)
            out = -1
        if scratch is not None:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
        full = e

    try:
        before = os.fstat(fd)
        try:
            kind = decide_codec(fd, size, chunk_size, compress, min_saving)
        except EOFError as e:
            raise UsageError(f"{src!r} shrank while it was being published") from e
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
                try:
                    pwrite_all(out, view, off)
                except OSError as e:
                    if e.errno not in FULL:
                        raise
                    drop(e)
            handoff(mf.Chunk(cid, n, kind), view)
        after = os.fstat(fd)
        seen = _change(before, after, size)
        if seen == CHANGED:
            raise _changed(src)
        mtime = after.st_mtime_ns
        if seen == UNCLEAR:
            mtime = _confirm(fd, src, size, chunk_size, ids)
        recordable_mtime(src, mtime)
        blob = None
        if out >= 0 and tier is not None and scratch is not None:
            try:
                os.utime(out, ns=(mtime, mtime))
                os.fsync(out)
                os.fchmod(out, mode)
                os.close(out)
                out = -1
                blob = tier.install_new(scratch, file_digest(ids))
            except OSError as e:
                if e.errno not in FULL:
                    raise
                drop(e)
        return Ingested(ids, kind, blob, mtime, full)
    except BaseException:
        if scratch is not None:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
        raise
    finally:
        os.close(fd)
        if out >= 0:
            os.close(out)


@dataclass(frozen=True, slots=True)
class SmallRead:
    """A batch of one-chunk files read whole, their blobs not yet stored."""

    files: list[tuple[bytes, int, int, bytes, int]]  # a SmallFile's fields but its blob
    data: list[bytes]  # each file's raw bytes: its blob

    def __repr__(self) -> str:
        return f"SmallRead({len(self.files)} files, {sum(map(len, self.data))} bytes)"


def read_small(
    fds: Sequence[int], files: Sequence[SourceFile], *, compress: str, min_saving: float
) -> SmallRead:
    """Read a batch of one-chunk files whole (blocking): hash each and choose its codec
    (`codec.choose_small`; "always" tries every file whole). A file whose size or mtime
    changed while it was read is refused. Closes `fds`."""
    out: list[tuple[bytes, int, int, bytes, int]] = []
    raws: list[bytes] = []
    try:
        for f, fd in zip(files, fds, strict=True):
            data = _read_whole(fd, f)
            after = os.fstat(fd)
            mtime = after.st_mtime_ns
            if after.st_size != f.size or mtime != f.mtime or after.st_ctime_ns != f.ctime:
                # A stat after the read that matches the scan's says the file was not
                # written from the scan to the end of the read, so one stat does for two.
                # This one changed at some time since the scan: read it again between two.
                data, mtime = _read_between(fd, f)
            cid = blake3.blake3(data).digest()
            if compress == "never":
                kind, stored = mf.CODEC_RAW, data
            elif compress == "always":
                kind, chosen = codec.choose(data, codec.compress(data), min_saving)
                stored = bytes(chosen)
            else:
                kind, stored = codec.choose_small(data, min_saving)
            out.append((cid, f.size, kind, stored, mtime))
            raws.append(data)
        return SmallRead(out, raws)
    finally:
        _close_all(fds)


def _read_between(fd: int, f: SourceFile) -> tuple[bytes, int]:
    """All of `f` and the mtime it was read under; UsageError if it changed meanwhile. Read
    again where the stats cannot tell (UNCLEAR), CONFIRM_TRIES times at most."""
    for _ in range(CONFIRM_TRIES):
        before = os.fstat(fd)
        data = _read_whole(fd, f)
        after = os.fstat(fd)
        seen = _change(before, after, f.size)
        if seen == SAME:
            return data, recordable_mtime(f.path, after.st_mtime_ns)
        if seen == CHANGED:
            raise _changed(f.path)
    raise _unclear(f.path)


def _read_whole(fd: int, f: SourceFile) -> bytes:
    """All `f.size` bytes of `fd`: one pread, more only where the kernel returns fewer."""
    data = os.pread(fd, f.size, 0)
    if len(data) == f.size:
        return data
    parts = [data]
    got = len(data)
    while got < f.size:
        more = os.pread(fd, f.size - got, got)
        if not more:
            raise UsageError(f"{f.path!r} shrank while it was being published")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def store_small(read: SmallRead, modes: Sequence[int], tier: Tier | None) -> list[SmallFile]:
    """Store the blobs of a batch read by `read_small` in `tier` with each file's mtime and
    blob mode (tier.blob_mode of `modes`, the files') (blocking). They are made durable
    together by one syncfs before they are returned (and so before they are recorded): one
    sync per batch, not an fsync per file."""
    if tier is None or not read.files:
        return [SmallFile(*r, None) for r in read.files]
    store = _SmallStore(tier)
    for (cid, _, _, _, mtime), data, mode in zip(read.files, read.data, modes, strict=True):
        store.put(cid, data, mtime, blob_mode(mode))
    blobs = store.write()
    store.sync()
    return [SmallFile(*r, blob) for r, blob in zip(read.files, blobs, strict=True)]


class _SmallStore:
    """The blobs of a batch of small files, queued by `put`, written into a tier together
    by `write` (Tier.write_wholes: no fsync) and made durable by one `sync`. Files of the
    batch with the same bytes share one blob, which gets the last one's mtime and mode (as
    writing each in turn would leave it)."""

    def __init__(self, tier: Tier) -> None:
        self.tier = tier
        # The tier's failed syncs before any blob of the batch is written: one that failed
        # for another caller meanwhile may have been told this batch's write-back error
        # (it is told once), and this batch's own sync then passes (durable.Durability)
        self.failed_at = tier.failed_syncs
        # digest -> (bytes, mtime, mode), by put
        self.blobs: dict[bytes, tuple[bytes, int, int]] = {}
        self.puts: list[bytes] = []  # the digest of each put, in order
        self.written: list[bytes] = []  # the digests `write` wrote

    def __repr__(self) -> str:
        return f"_SmallStore({self.tier.name!r}, {len(self.puts)} files, {len(self.blobs)} blobs)"

    def put(self, cid: bytes, data: bytes, mtime: int, mode: int) -> None:
        """Queue one file's blob (its chunk `cid` is all of `data`)."""
        digest = file_digest([(cid, len(data))])
        self.blobs[digest] = (data, mtime, mode)
        self.puts.append(digest)

    def write(self) -> list[BlobStat | None]:
        """Write every queued blob whose name no file has (Tier.install_new says why): the
        BlobStat of each put, in order, None for those not written. Every blob is tried;
        then the first that failed (it left nothing behind) is raised."""
        # (One stat call for the batch, in C off the GIL: a Python stat each cost the store,
        # the publish's busiest stage, ~40 ms a 10,000 files.)
        names = list(self.blobs)
        seen = fastcopy.lstat_paths([self.tier.blob_file(d) for d in names])
        new = [d for d, st in zip(names, seen, strict=True) if isinstance(st, int)]
        got = self.tier.write_new([(d, *self.blobs[d]) for d in new], "storing a published blob")
        stats: dict[bytes, BlobStat] = {}
        failed: TierError | None = None
        for d, r in zip(new, got, strict=True):
            if isinstance(r, TierError):
                failed = failed or r
            elif r is not None:  # (None: a fill named it since the check above)
                stats[d] = r
        if failed is not None:
            # Those written are neither synced nor recorded: removed, not left in the tier
            # uncounted (the ones a fill has put its own copy in the place of since, kept).
            for st in stats.values():
                self.tier.remove_unrecorded(st)
            raise failed
        self.written = list(stats)
        return [stats.get(d) for d in self.puts]

    def sync(self) -> None:
        self.tier.sync(self.written)
        if (theirs := self.tier.failed_since(self.failed_at)) is not None:
            raise theirs


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
        pack_size: int,
        resolver: Resolver,
        storage: Storage,
        spawner: Spawner,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.spawner = spawner
        self.cache = cache
        self.origin = origin
        self.chunk_size = chunk_size
        self.compress = compress
        self.min_saving = min_saving
        self.upload_concurrency = upload_concurrency
        # Large files' chunks go into packs of up to this many bytes, one file's in each (0:
        # into objects of their own); one publish holds PACKS_HELD such packs at most.
        self.pack_size = pack_size
        self.runs: set[_Run] = set()  # the publishes under way (for reprs and tests)
        # The packs being put by a publish under way, by id: another publish of the same
        # files waits for that one instead of asking the origin, and uploading, itself.
        self.pack_puts: dict[bytes, asyncio.Future[None]] = {}
        self.pack_joins = 0  # pack puts that waited for another publish's (for tests)
        # Knows the host's facts and each kind's; reads the ref's previous manifest (the
        # local record first) to reuse its chunks.
        self.resolver = resolver
        self.reflog = RefLog(origin)  # sets refs, keeping their history at the origin
        self.clock = clock
        # Reading and hashing the tree gets threads of its own: in the shared pool it would
        # queue behind the uploads' chunk reads and leave the origin waiting for work.
        self.ingest_pool = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="hostd-ingest")
        # Batches of small files go through three stages of one thread each, so that one
        # batch is opened (waiting on the caller's helper, another process) while the one
        # before is read and hashed, and the one before that has its blobs written (in C,
        # without the GIL) and synced. Each stage takes its next batch from its pool's queue
        # as soon as it is done with one, without waiting for the loop.
        self.open_pool = ThreadPoolExecutor(1, thread_name_prefix="hostd-open")
        self.read_pool = ThreadPoolExecutor(1, thread_name_prefix="hostd-read")
        self.store_pool = ThreadPoolExecutor(1, thread_name_prefix="hostd-store")

    def adopt_late(
        self,
        job: Future[T],
        tier: Tier,
        chunk_size: int,
        blobs: Callable[[T], Sequence[BlobStat | None]],
    ) -> None:
        """A publish failed or was cancelled while a thread of it was storing blobs (`job`,
        not cancellable once begun): the blobs it leaves, durable, in the tier are recorded
        once it is done, or the tier's filesystem would hold bytes no budget counts and no
        eviction frees until the next start."""
        if job.cancelled():
            return
        loop = asyncio.get_running_loop()

        def adopt(done: Future[T]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            stored = [b for b in blobs(done.result()) if b is not None]
            if stored:
                self.cache.adopt_durable(tier, stored, chunk_size)

        def done(j: Future[T]) -> None:
            with contextlib.suppress(
                RuntimeError
            ):  # (the loop is closed: the next start finds them)
                loop.call_soon_threadsafe(adopt, j)

        job.add_done_callback(done)

    def close(self) -> None:
        for pool in (self.ingest_pool, self.open_pool, self.read_pool, self.store_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"Publisher({self.origin.url}, chunk_size={self.chunk_size}, "
            f"pack_size={self.pack_size}, compress={self.compress}, {len(self.runs)} running)"
        )

    async def publish(self, req: PublishRequest, progress: Progress) -> dict[str, Any]:
        t0 = self.clock()
        validate_ref(req.ref)
        self._check_facts(req)
        cs = req.chunk_size or self.chunk_size
        progress.phase = "hash"
        fs = await self.spawner.start(req.caller, req.pidfd)
        try:
            tree = await self.spawner.run(
                scan_tree, fs, req.path, self.storage, req.include, req.exclude
            )
            for entry in tree.skipped:
                progress.warnings.append(_skipped_warning(entry))
            progress.admitted = True  # scanned: what fails from here is an `error` event
            # The blobs it stores are held until the snapshot naming them is recorded: gc
            # and eviction would take them for blobs no snapshot names.
            stored: dict[bytes, None] = {}
            with self.cache.holding(stored):
                return await self._publish(req, fs, tree, cs, progress, t0, stored)
        finally:
            await self.spawner.run(fs.close)

    def _check_facts(self, req: PublishRequest) -> None:
        """A fact the publish names (`facts`) must be one hostd knows (it tells, detects, or
        a kind names) or one the request gives a value: a name it can know nothing of (a
        typo, `gpu_modle`) would be published as `none`, which every host fits, and a
        compile cache meant for one GPU would go to every other."""
        given = set(req.compat)
        names = {n for names in self.resolver.kinds.values() for n in names}
        known = names | set(self.resolver.known) | compat.DETECTED | set(compat.basic_facts())
        for name in req.facts or ():
            if name not in known and name not in given:
                raise UsageError(
                    f"field 'facts': {name!r} is no fact hostd knows "
                    f"({', '.join(sorted(known))}) and the request gives it no value: give "
                    f"it one ({name}=VALUE in compat, --compat on the command line), or name "
                    "a fact hostd knows"
                )

    async def _publish(
        self,
        req: PublishRequest,
        fs: AsUser,
        tree: Tree,
        cs: int,
        progress: Progress,
        t0: float,
        stored: dict[bytes, None],
    ) -> dict[str, Any]:
        progress.total_files = len(tree.files)
        progress.fill.total_bytes = sum(tree.files.size)
        names = self.resolver.kinds[req.kind] if req.facts is None else req.facts
        facts = compat.publish_facts(names, req.compat, self.resolver.known)
        digest = compat_digest(facts)
        if not compat.gpu_claim(facts) and compat.GPU_FACTS & set(names):
            progress.warnings.append(_no_gpu_warning(facts))
        before = await self._previous(req.ref, digest)
        why = shrink_refusal(
            files=len(tree.files),
            symlinks=len(tree.symlinks),
            size=progress.fill.total_bytes,
            before=(len(before.files), before.total_bytes) if before is not None else None,
        )
        if why is not None and not req.force:
            raise UsageError(
                f"refusing to move ref {req.ref!r} to {str(req.path)!r}: {why}; "
                "publish with --force to move it anyway"
            )
        known = await self._reusable(req.ref, before) if before is not None else {}
        run = _Run(self, fs, cs, progress, known, stored)
        self.runs.add(run)
        try:
            entries = await run.all(tree.files)
        finally:
            self.runs.discard(run)
        # The scan's columns go too (their paths live on in the entries): ~5 MB a 100,000
        # files, held through the manifest's build otherwise.
        tree.files.clear()
        t1 = self.clock()
        # Sorting, checking and encoding the manifest of 10,000 files takes ~100 ms: a
        # thread's, not the loop's.
        m, snapshot_id = await asyncio.to_thread(
            _build_manifest, cs, entries, tree, facts, req.meta
        )
        progress.phase = "upload"
        await self.origin.put_manifest(snapshot_id, m.encoded)
        moved = await self.reflog.move(req.ref, digest, snapshot_id)
        self.cache.record_snapshot(m, built=True)
        self.cache.index.put_ref(req.ref, digest, snapshot_id, time.time())
        t2 = self.clock()
        return {
            "snapshot": snapshot_id,
            "ref": req.ref,
            "kind": req.kind if req.facts is None else compat.kind_of(facts, self.resolver.kinds),
            "compat": facts,
            "files": len(m.files),
            "symlinks": len(m.symlinks),
            "chunks": m.chunk_count,
            "bytes": m.total_bytes,
            "new_chunks": run.new_chunks,
            "compressed_chunks": run.compressed,
            "stored_bytes": run.stored_bytes,
            "packs": run.packs,
            "cached": run.cached,
            "skipped": tree.skipped,
            "warnings": [w["message"] for w in progress.warnings if w["warning"] != "skipped"],
            "previous": moved.previous,
            "ref_seq": moved.seq,
            "timings": {"hash": t1 - t0, "commit": t2 - t1, "total": t2 - t0},
        }

    async def _reusable(self, ref: str, before: mf.Manifest) -> dict[bytes, mf.Chunk]:
        """The previous snapshot's chunks a publish may point at where they are: those in
        objects of their own (the uploader looks at each, as at any chunk), and those in
        packs found at the origin at the size its manifest states (one HEAD a pack). A pack
        that is missing, or of another size (a truncated or damaged object), is not reused:
        its chunks are stored anew, so publishing the tree again repairs the ref."""
        if not before.packs:
            return {c.id: c for f in before.files for c in f.chunks}

        async def intact(pack: bytes, size: int) -> bool:
            try:
                return await self.origin.pack_stored_size(pack) == size
            except OriginError as e:
                log.warning("publish %s: cannot look at pack %s: %s", ref, pack.hex(), e)
                return False

        oks = await asyncio.gather(*(intact(p, n) for p, n in before.packs))
        good = {p for (p, _), ok in zip(before.packs, oks, strict=True) if ok}
        if len(good) < len(before.packs):
            log.warning(
                "publish %s: %d of the previous snapshot's %d packs are missing or damaged at "
                "origin %s: their chunks are stored anew",
                ref,
                len(before.packs) - len(good),
                len(before.packs),
                self.origin.url,
            )
        return {
            c.id: c
            for f in before.files
            for c in f.chunks
            if c.packed is None or c.packed.pack in good
        }

    async def _previous(self, ref: str, digest: str) -> mf.Manifest | None:
        """The ref's current snapshot under the same compat key: its chunks are already at
        the origin (a republished tree's unchanged files point at them where they are, in
        their packs, instead of being stored again), and its size is what a much smaller
        tree is checked against. None when there is none, or it cannot be read: then
        everything is stored anew, which is only slower."""
        try:
            sid = await self.origin.get_ref(ref, digest)
            if sid is None:
                return None
            return await self.resolver.manifest(sid)
        except (OriginError, ManifestError, NotFound) as e:
            log.warning("publish %s: not reusing the previous snapshot's chunks: %s", ref, e)
            return None


def _build_manifest(
    chunk_size: int,
    files: Sequence[mf.FileEntry],
    tree: Tree,
    compat: Mapping[str, str],
    meta: Mapping[str, str],
) -> tuple[mf.Manifest, str]:
    """The manifest and its snapshot id (its canonical bytes, encoded and hashed here)."""
    memory.trim_for(len(files))  # (the files' batches and the maps of chunks are garbage)
    m = mf.build(
        chunk_size=chunk_size,
        files=files,
        symlinks=tree.symlinks,
        dirs=tree.dirs,
        compat=compat,
        meta=meta,
    )
    return m, m.snapshot_id


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _owned_fds(opening: Awaitable[list[int]]) -> list[int]:
    """Await descriptors being opened in a thread; if we are cancelled meanwhile, the
    thread still finishes, and what it opened is closed rather than leaked."""
    job = asyncio.ensure_future(opening)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(
            lambda j: None if j.cancelled() or j.exception() else _close_all(j.result())
        )
        raise


class _Smalls:
    """A publish's small files as they are placed in packs: each one's index in the tree's
    `files`, chunk id and recorded mtime, in columns."""

    __slots__ = ("at", "files", "ids", "mtimes")

    def __init__(self, files: Files) -> None:
        self.files = files
        self.at = array("L")
        self.ids: list[bytes] = []
        self.mtimes = array("q")

    def __repr__(self) -> str:
        return f"_Smalls({len(self.ids)} files)"

    def add(self, i: int, cid: bytes, mtime: int) -> None:
        self.at.append(i)
        self.ids.append(cid)
        self.mtimes.append(mtime)


def _entries(
    larges: Sequence[mf.FileEntry],
    packed: bool,
    smalls: _Smalls,
    placed: Mapping[bytes, mf.Chunk],
) -> list[mf.FileEntry]:
    """Every file's entry, each packed chunk where it was placed: the large files' (when
    `packed`: their chunks went into packs, or were found placed already) and the small
    files'."""
    memory.trim_for(len(smalls.files))  # (the batches' garbage, before the entries)
    out = list(larges)
    if packed:
        out = [
            mf.FileEntry(e.path, e.mode, e.size, tuple(placed[c.id] for c in e.chunks), e.mtime)
            for e in larges
        ]
    files = smalls.files
    paths, modes, sizes = files.paths, files.mode, files.size
    out += [
        mf.FileEntry(paths[i], modes[i], sizes[i], (placed[cid],), mtime)
        for i, cid, mtime in zip(smalls.at, smalls.ids, smalls.mtimes, strict=True)
    ]
    return out


async def _run_closing_fds(pool: ThreadPoolExecutor, fn: Callable[[], T], fds: Sequence[int]) -> T:
    """Run `fn`, which closes `fds` whatever happens, in `pool`; if it never starts (we are
    cancelled while it waits in the pool's queue, or the pool shuts down), close them here."""
    job = pool.submit(fn)
    try:
        return await asyncio.wrap_future(job)
    finally:
        if job.cancel():  # True only for a job that never ran
            _close_all(fds)


# Small files are read, hashed and stored in batches of this many files or bytes: one round
# trip to the caller's helper and one thread hop per stage per batch, one syncfs per batch.
# Each hop costs the thread that takes it a wait for the GIL: at 128 files a batch, a
# publish of 10,000 small files took a fifth longer. Two batches' source descriptors are
# open at a time, at most.
SMALL_BATCH_FILES = 512
SMALL_BATCH_BYTES = 4 * 1024 * 1024
# Batches between being opened and placed in packs, at most (each of SMALL_BATCH_BYTES at
# most): one opening, one queued to be read and one being read, one queued to be stored and
# one being stored, one being recorded.
SMALL_BATCHES_AHEAD = 6


class _Run:
    """One publish: files ingested on threads, large ones one by one on the ingest pool (their
    chunks handed through a bounded queue to upload workers, or, with `pack_size`, packed
    into packs of their file on the ingest thread, bounded by `budget`, and the sealed packs
    queued), small ones (one chunk, smaller than the chunk size) in batches through the
    stages of Publisher's small-file pools, their chunks packed together into pack objects of
    up to a chunk's size, in path order, so a restore reads a pack's neighbours with one
    ranged GET. The queue and the budget bound the memory a publish holds."""

    def __init__(
        self,
        p: Publisher,
        fs: AsUser,
        chunk_size: int,
        progress: Progress,
        known: dict[bytes, mf.Chunk],
        stored: dict[bytes, None],
    ) -> None:
        self.p = p
        self.fs = fs
        self.stored = stored  # the blobs it stored (held: Publisher.publish), added as adopted
        self.full: set[str] = set()  # the tiers whose filesystem filled up (`filled`)
        self.cs = chunk_size
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[mf.Chunk, bytes] | PackUpload | LargePack | None] = (
            asyncio.Queue(maxsize=2 * p.upload_concurrency)
        )
        self.pack_size = p.pack_size  # large files' packs; 0: their chunks are objects
        self.min_saving = p.min_saving
        self.seen: set[bytes] = set()
        # Where each chunk is at the origin: the previous snapshot's, then this run's own
        # (a small file's once its pack is hashed, by the uploader that takes it; a large
        # file's once its pack is sealed, hashed as it was filled).
        self.placed: dict[bytes, mf.Chunk] = dict(known)
        self.packed: set[bytes] = set()  # the chunks this run put in packs, sealed or not
        # The small files' pack being filled: their stored bytes, back to back (not kept
        # each its own bytes until the pack is sealed), and where each chunk lies in it.
        self.pack_buf = io.BytesIO()
        self.filling = PackChunks()
        self.new_chunks = 0
        self.compressed = 0
        self.stored_bytes = 0
        self.packs = 0
        self.cached = 0
        self.cancel = threading.Event()
        unit = max(self.pack_size, mf.max_stored_size(chunk_size))
        self.budget = PackBudget(PACKS_HELD * unit, self.cancel)

    def __repr__(self) -> str:
        return (
            f"_Run({self.progress.done_files} files done, {self.packs} packs, "
            f"{self.new_chunks} new chunks, {self.budget!r})"
        )

    async def all(self, files: Files) -> list[mf.FileEntry]:
        out: list[mf.FileEntry] = []
        # Each small file's index in `files`, chunk id and mtime (not its bytes: those go
        # with its pack), in path order.
        smalls = _Smalls(files)
        try:
            async with asyncio.TaskGroup() as tg:
                workers = [
                    tg.create_task(self.uploader()) for _ in range(self.p.upload_concurrency)
                ]
                # INGEST_THREADS jobs at once: one at a time would leave the ingest thread
                # idle for a loop round trip between them.
                slots = asyncio.Semaphore(INGEST_THREADS)
                ahead = asyncio.Semaphore(SMALL_BATCHES_AHEAD)
                # Source descriptors held: those of the batch being read and the next one.
                opened = asyncio.Semaphore(2)

                async def one(f: SourceFile) -> mf.FileEntry:
                    async with slots:
                        return await self.file(f)

                async def batch(at: array[int]) -> list[SmallFile]:
                    # Batches enter each stage's queue in path order (the semaphore wakes its
                    # waiters in order), each stage's next queued before it is done with one.
                    # The permit is given back once the batch is placed (below), so reading
                    # waits for uploads, and a batch's bytes are held by this publish at most
                    # SMALL_BATCHES_AHEAD batches before they reach the upload queue. Its
                    # files' records are made here: not one for every file of the tree.
                    await ahead.acquire()
                    fs_ = [files[i] for i in at]
                    async with opened:  # until they are read and closed
                        fds = await _owned_fds(
                            self.loop.run_in_executor(
                                self.p.open_pool,
                                self.fs.open_files,
                                [(f.path, f.ident, f.via) for f in fs_],
                            )
                        )
                        read = await self.read(fs_, fds)
                    got, tier = await self.store(fs_, read)
                    return await self.record(fs_, got, tier)

                larges: list[asyncio.Task[mf.FileEntry]] = []
                # (taken off as they are placed: a done task holds its batch's bytes)
                batches: deque[tuple[array[int], asyncio.Task[list[SmallFile]]]] = deque()
                pending, size = array("L"), 0
                for i, n in enumerate(files.size):
                    if not 0 < n < self.cs:
                        larges.append(tg.create_task(one(files[i])))
                        continue
                    pending.append(i)
                    size += n
                    if len(pending) >= SMALL_BATCH_FILES or size >= SMALL_BATCH_BYTES:
                        batches.append((pending, tg.create_task(batch(pending))))
                        pending, size = array("L"), 0
                if pending:
                    batches.append((pending, tg.create_task(batch(pending))))
                # Packs are filled in the tree's order, whatever order the batches end in
                # (and whatever the large files do meanwhile).
                # Every TRIM_FILES small files placed, while more come, the heap is trimmed:
                # what the batches freed stayed resident (~30 MB at 100,000 files), among
                # what the publish keeps (its chunk maps, the blob records).
                trim_at = memory.TRIM_FILES
                while batches:
                    at, job = batches.popleft()
                    for i, sf in zip(at, await job, strict=True):
                        sealed = self.place(sf)
                        if sealed is not None:
                            await self.queue.put(sealed)
                        smalls.add(i, sf.cid, sf.mtime)
                    ahead.release()
                    if batches and len(smalls.ids) >= trim_at:  # (the batches' garbage)
                        trim_at += memory.TRIM_FILES
                        await asyncio.to_thread(memory.trim_heap)
                if (sealed := self.seal()) is not None:
                    await self.queue.put(sealed)
                for large in larges:
                    out.append(await large)
                for _ in workers:
                    await self.queue.put(None)
        except BaseException as exc:
            self.cancel.set()  # an ingest thread waiting to hand a chunk over gives up
            self.budget.wake()  # and one waiting for room for a chunk in its pack
            err = first_error(exc)
            if err is not None and not isinstance(exc, asyncio.CancelledError):
                raise err from None
            raise
        # Every pack is hashed and uploaded: each packed chunk is placed. (Ten thousand
        # entries take milliseconds: a thread's. Nothing changes `placed` any more.)
        entries = await asyncio.to_thread(_entries, out, bool(self.pack_size), smalls, self.placed)
        # What the entries do not hold goes before the manifest is built, the publish's peak
        # (its chunks are the entries' now): ~10 MB a 100,000 files.
        self.placed, self.packed, self.seen = {}, set(), set()
        return entries

    async def read(self, files: list[SourceFile], fds: list[int]) -> SmallRead:
        """Read and hash a batch of small files (closes `fds`)."""
        try:
            return await _run_closing_fds(
                self.p.read_pool,
                functools.partial(
                    read_small, fds, files, compress=self.p.compress, min_saving=self.p.min_saving
                ),
                fds,
            )
        except OSError as e:
            raise UsageError(f"cannot read {files[0].path!r} and others: {e.strerror}") from e

    async def store(
        self, files: list[SourceFile], read: SmallRead
    ) -> tuple[list[SmallFile], Tier | None]:
        """Store a batch's blobs in the first tier with room: durable, not yet recorded."""
        total = sum(f.size for f in files)
        tier = await self.p.cache.reserve(total, self.tiers())
        modes = [f.mode for f in files]
        try:
            job = self.p.store_pool.submit(store_small, read, modes, tier)
            try:
                return await asyncio.wrap_future(job), tier
            except asyncio.CancelledError:
                if tier is not None:
                    self.p.adopt_late(job, tier, self.cs, lambda got: [sf.blob for sf in got])
                raise
            except TierError as e:
                if tier is None or not e.full:
                    raise
                self.filled(tier, e.message)  # (store_small left none of the batch's blobs)
                return store_small(read, modes, None), None
        finally:
            if tier is not None:
                self.p.cache.unreserve(tier, total)

    async def record(
        self, files: list[SourceFile], got: list[SmallFile], tier: Tier | None
    ) -> list[SmallFile]:
        """Record a batch's stored (and synced) blobs: their rows go in one transaction."""
        if tier is not None:
            stored = [sf.blob for sf in got if sf.blob]
            self.stored.update(dict.fromkeys(b.digest for b in stored))
            await asyncio.wrap_future(self.p.cache.adopt_durable(tier, stored, self.cs))
            self.cached += len(stored)
        self.progress.done_files += len(files)
        self.progress.fill.done_bytes += sum(f.size for f in files)
        return got

    def place(self, sf: SmallFile) -> PackUpload | None:
        """Put a small file's chunk into the pack being filled, unless the origin has it or
        will (the previous snapshot's, or an earlier file of this tree with equal bytes).
        The pack it closed to make room, if it did, is to be queued for upload."""
        if sf.cid in self.placed or sf.cid in self.packed:
            return None
        sealed = None
        if self.filling and self.pack_buf.tell() + len(sf.stored) > self.cs:
            sealed = self.seal()
        self.filling.add(sf.cid, sf.size, sf.codec, self.pack_buf.tell(), len(sf.stored))
        self.packed.add(sf.cid)
        self.pack_buf.write(sf.stored)
        return sealed

    def seal(self) -> PackUpload | None:
        """Close the pack being filled, if any: an uploader names it by its content."""
        if not self.filling:
            return None
        pack = PackUpload(self.pack_buf.getvalue(), self.filling)  # (no copy of the bytes)
        self.pack_buf, self.filling = io.BytesIO(), PackChunks()
        return pack

    async def file(self, f: SourceFile) -> mf.FileEntry:
        if f.size == 0:
            self.progress.done_files += 1
            return mf.FileEntry(f.path, f.mode, 0, (), f.mtime)
        tier = await self.p.cache.reserve(f.size, self.tiers())
        scratch = tier.tmp_dir / f"publish-{os.getpid()}-{id(f)}" if tier else None
        packs = FilePacks(self) if self.pack_size else None
        job = functools.partial(
            ingest,
            functools.partial(self.fs.open_file, f.path, f.ident, f.via),
            f.path,
            f.size,
            self.cs,
            tier=tier,
            scratch=scratch,
            compress=self.p.compress,
            min_saving=self.p.min_saving,
            handoff=self.handoff if packs is None else packs.add,
            mode=blob_mode(f.mode),
        )
        ingesting = self.p.ingest_pool.submit(
            job if packs is None else functools.partial(packs.ingest, job)
        )
        try:
            got = await asyncio.wrap_future(ingesting)
        except asyncio.CancelledError:
            if tier is not None:
                self.p.adopt_late(ingesting, tier, self.cs, lambda got: [got.blob])
            raise
        except OSError as e:
            if tier is not None and scratch is not None and e.filename in (None, str(scratch)):
                raise tier_error(tier.name, scratch, e, "storing a published blob") from e
            raise UsageError(f"cannot read {f.path!r}: {e.strerror}") from e
        finally:
            if tier is not None:
                self.p.cache.unreserve(tier, f.size)
        if tier is not None and got.full is not None:
            self.filled(
                tier,
                tier_error(tier.name, scratch or "", got.full, "storing a published blob").message,
            )
        if tier is not None and got.blob is not None:
            self.p.cache.adopt(tier, got.blob, self.cs)
            self.stored[got.blob.digest] = None
            self.cached += 1
        self.progress.done_files += 1
        self.progress.fill.done_bytes += f.size
        # With packs, where each chunk lies is known once every pack is sealed (`_entries`).
        chunks = tuple(mf.Chunk(cid, n, got.codec) for cid, n in got.ids)
        return mf.FileEntry(f.path, f.mode, f.size, chunks, got.mtime)

    def tiers(self) -> list[Tier]:
        """The tiers it may still store blobs in: those whose filesystem did not fill up."""
        return [t for t in self.p.cache.tiers if t.name not in self.full]

    def filled(self, tier: Tier, why: str) -> None:
        """A tier's filesystem filled up while the run stored a blob (more than its budget
        left room for: something else writes there too, or the budget is over its size):
        the rest of the publish is not cached in it, and says so once. Caching is best
        effort; the snapshot is published whole all the same."""
        if tier.name in self.full:
            return
        self.full.add(tier.name)
        self.p.cache.cramped(tier.name)
        message = (
            f"{why}: the rest of this publish is not cached in tier {tier.name!r}; the "
            "snapshot is published whole all the same"
        )
        log.warning("publish: %s", message)
        self.progress.warnings.append(
            {"warning": "tier_full", "tier": tier.name, "message": message}
        )

    def handoff(self, chunk: mf.Chunk, data: memoryview) -> None:
        """Called on the ingest thread: queue a chunk for upload, waiting while the queue is
        full (backpressure), and giving up when the publish is cancelled."""
        self.on_loop(self.queue.put((chunk, bytes(data))))

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Called on an ingest thread: run `coro` on the loop, where the run's state
        changes, and wait for it; Stopped (and `coro` cancelled) once the publish is."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        while True:
            try:
                return fut.result(timeout=0.1)
            except FutureTimeout:
                if self.cancel.is_set():
                    fut.cancel()
                    raise Stopped() from None

    async def claim(self, cid: bytes) -> bool:
        """Whether a large file's chunk is to go into its pack: not when the previous
        snapshot stored it, nor when this run has put it in a pack (of this file, another,
        or a small file's), sealed or not. No HEAD: dedup across refs through objects of
        their own is what pack_size 0 is for."""
        if cid in self.placed or cid in self.packed:
            return False
        self.packed.add(cid)
        return True

    async def put_pack(
        self, pack: bytes, data: bytes, chunks: Iterable[tuple[bytes, tuple[int, int, int, int]]]
    ) -> None:
        """Upload a pack, and count it and its chunks as stored, unless the origin has an
        object of its size under its name already. Named by its content, that object is this
        pack: another ref's publish of the same files stored it (a large file's packs are cut
        from its own bytes alone, so the same weights under a second ref, or in a variant of
        a model, cost a HEAD a pack instead of their upload), or this ref's publish that
        failed after it. Readers verify every chunk all the same; one of any other size (a
        truncated upload, a damaged bucket) is written over. A publish of this daemon's
        putting the same pack is waited for (`Publisher.pack_puts`), and where it succeeds,
        this one has nothing to do."""
        puts = self.p.pack_puts
        while (other := puts.get(pack)) is not None:  # (one that failed: this one tries)
            self.p.pack_joins += 1
            await asyncio.wait({other})
            if not other.cancelled() and other.exception() is None:
                return
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        puts[pack] = mine
        try:
            stored = await self._put_pack(pack, data)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                mine.cancel()
            else:
                mine.set_exception(e)
                mine.exception()  # (retrieved: a publish waiting for it reads it itself)
            raise
        else:
            mine.set_result(None)
        finally:
            if puts.get(pack) is mine:
                del puts[pack]
        if not stored:
            return
        kinds = [kind for _, (_, kind, _, _) in chunks]
        self.packs += 1
        self.new_chunks += len(kinds)
        self.compressed += kinds.count(mf.CODEC_ZSTD)
        self.stored_bytes += len(data)

    async def _put_pack(self, pack: bytes, data: bytes) -> bool:
        """HEAD, then PUT unless an object of its size is there: whether it was put. A HEAD
        refused (credentials that may write but not read, say) is no reason not to put; one
        the origin did not answer through its retries is this publish's failure: a PUT's own
        retries would only double the time it takes to say so."""
        try:
            there = await self.p.origin.pack_stored_size(pack)
        except OriginError as e:
            if e.unanswered:
                raise
            log.info("publish: cannot look for pack %s, uploading it: %s", pack.hex(), e)
            there = None
        if there == len(data):
            return False
        await self.p.origin.put_pack(pack, data)
        return True

    def place_pack(
        self, pack: bytes, size: int, chunks: Mapping[bytes, tuple[int, int, int, int]] | PackChunks
    ) -> None:
        """Record where each of `chunks` (id -> size, codec, offset, length) lies in a pack
        named `pack` of `size` bytes."""
        for cid, (n, kind, offset, length) in chunks.items():
            self.placed[cid] = mf.Chunk(cid, n, kind, mf.Packed(pack, offset, length, size))

    async def sealed(self, pack: LargePack) -> None:
        """A large file's pack is sealed: its chunks are placed (its id is known), and it
        is queued for upload, waiting while the queue is full."""
        self.place_pack(pack.id, len(pack.data), pack.chunks)
        await self.queue.put(pack)

    async def uploader(self) -> None:
        while (item := await self.queue.get()) is not None:
            held = await self.upload(item)
            # Not kept while this worker waits for the next: a pack's bytes, once given
            # back to the budget, are held by no one.
            del item
            self.budget.give(held)

    async def upload(self, item: tuple[mf.Chunk, bytes] | PackUpload | LargePack) -> int:
        """Upload what was queued; the bytes to give back to the budget."""
        if isinstance(item, LargePack):
            await self.put_pack(item.id, item.data, item.chunks.items())
            return len(item.data)
        if isinstance(item, PackUpload):
            # Hashing a pack of a chunk's size takes milliseconds: a thread's (blake3
            # releases the GIL).
            pack = await asyncio.to_thread(chunk_id, item.data)  # (BLAKE3 of its bytes)
            self.place_pack(pack, len(item.data), item.chunks)
            await self.put_pack(pack, item.data, item.chunks.items())
            return 0
        c, data = item
        if c.id in self.seen:
            return 0
        self.seen.add(c.id)
        # (one the previous snapshot stored as an object of its own too: it may be damaged)
        # An object under the chunk's name is taken as the chunk only where its size is one
        # the chunk's bytes can have: raw, or as this publish would store them. One of any
        # other size (zero bytes, a truncated upload, a damaged bucket) is written over:
        # named by content, any valid bytes for the id may replace it.
        there = await self.p.origin.chunk_stored_size(c.id)
        if there is not None and there == len(data):
            return 0
        stored: bytes = data
        kind = mf.CODEC_RAW
        if c.codec == mf.CODEC_ZSTD:
            packed = await asyncio.to_thread(codec.compress, data)
            kind, chosen = codec.choose(data, packed, self.p.min_saving)
            stored = bytes(chosen)
        if there is not None and there == len(stored):
            return 0
        if there is not None:
            log.warning(
                "chunk %s at origin %s is %d bytes, which its bytes cannot be: uploading it again",
                c.id.hex(),
                self.p.origin.url,
                there,
            )
        if kind == mf.CODEC_ZSTD:
            self.compressed += 1
        await self.p.origin.put_chunk(c.id, stored)
        self.new_chunks += 1
        self.stored_bytes += len(stored)
        return 0

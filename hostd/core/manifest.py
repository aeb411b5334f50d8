"""The manifest: a snapshot's table of contents, its canonical encoding and its validation.

The snapshot id is the BLAKE3 of the canonical msgpack bytes, so `decode` accepts only bytes
that `encode` would produce: maps with sorted string keys, no floats, the shortest integer
forms, ids as 32-byte bin. Validation makes a decoded manifest safe to materialize: every
path is relative and stays inside the target, no path passes through a file or a symlink,
and every symlink resolves inside the tree however its components are followed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import blake3
import msgpack

from hostd.core.ids import HASH_LEN, file_digest
from hostd.errors import ManifestError

FORMAT_VERSION = 2  # what publish writes
READABLE_FORMATS = (1, 2)  # what this hostd restores (FORMAT.md section 7)
CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 256 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_PATH_BYTES = 4096
FACT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


# Margin over zstd's compress bound: the largest frame header (ZSTD_FRAMEHEADERSIZE_MAX, 18
# bytes) and a content checksum (4). ZSTD_COMPRESSBOUND already covers both for the frames
# zstd writes (checked from 0 B to 8 MiB, levels -5..19, one-shot and streamed); the margin
# is for other writers' header choices.
ZSTD_FRAME_MARGIN = 18 + 4
_ZSTD_SMALL = 128 * 1024


def max_stored_size(raw_size: int) -> int:
    """The most bytes a chunk of `raw_size` raw bytes may take at the origin, whichever codec
    it was stored with: what a reader reads at most before decoding (a format rule, so it
    lives here; codec.py uses it).

    A chunk object may be raw or a zstd frame whatever the manifest says, so this admits
    both: zstd's worst case, ZSTD_COMPRESSBOUND from zstd.h (the zstandard package does not
    expose it), `size + size/256 + (128 KiB - size)/2048 below 128 KiB`, plus the margin.
    It is never less than `raw_size`, so a raw object always fits.
    """
    small = (_ZSTD_SMALL - raw_size) >> 11 if raw_size < _ZSTD_SMALL else 0
    return raw_size + (raw_size >> 8) + small + ZSTD_FRAME_MARGIN


# mtimes are signed nanoseconds since the epoch, as st_mtime_ns and utimensat take them.
MIN_MTIME = -(1 << 63)
MAX_MTIME = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Packed:
    """Where a chunk's stored bytes lie inside a pack object (format 2): `length` bytes at
    `offset` of `packs/<pack>`, an object of `pack_size` bytes (a reader plans its ranged
    reads of the pack with it)."""

    pack: bytes
    offset: int
    length: int
    pack_size: int


@dataclass(frozen=True, slots=True)
class Chunk:
    id: bytes
    size: int
    codec: int = CODEC_RAW
    # None: stored as its own object, chunks/<id>. The location is where to fetch it from the
    # origin only: the id alone names, verifies, dedups and assigns the chunk to a peer.
    packed: Packed | None = None

    def __hash__(self) -> int:
        # The id's: bytes keep their hash, and chunks are dict keys on every fetch (the
        # generated hash of all four fields, the pack's too, cost ~5 µs a lookup).
        # Equality still compares every field.
        return hash(self.id)


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    mode: int
    size: int
    chunks: tuple[Chunk, ...]
    mtime: int | None = None  # ns; None in format 1, which did not record it
    # `digest`, once asked for (slots: a decoded manifest of 100,000 files is kept for
    # reuse, and an instance dict per file would cost ~100 bytes of it)
    _digest: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def digest(self) -> bytes:
        """The blob this file's content is cached as."""
        d = self._digest
        if d is None:
            d = file_digest((c.id, c.size) for c in self.chunks)
            object.__setattr__(self, "_digest", d)
        return d

    def offsets(self, chunk_size: int) -> Iterator[tuple[int, Chunk]]:
        for i, c in enumerate(self.chunks):
            yield i * chunk_size, c


@dataclass(frozen=True, slots=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Manifest:
    chunk_size: int
    files: tuple[FileEntry, ...] = ()
    symlinks: tuple[Symlink, ...] = ()
    dirs: tuple[str, ...] = ()
    compat: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    packs: tuple[tuple[bytes, int], ...] = ()  # format 2: (id, size) of each pack, by id

    @cached_property
    def encoded(self) -> bytes:
        return encode(self)

    @cached_property
    def snapshot_id(self) -> str:
        return blake3.blake3(self.encoded).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def chunk_count(self) -> int:
        return sum(len(f.chunks) for f in self.files)

    def blobs(self) -> dict[bytes, FileEntry]:
        """One file entry per distinct blob (files with equal content share one blob)."""
        out: dict[bytes, FileEntry] = {}
        for f in self.files:
            if f.size:
                out.setdefault(f.digest, f)
        return out


def build(
    *,
    chunk_size: int,
    files: Sequence[FileEntry],
    symlinks: Sequence[Symlink] = (),
    dirs: Sequence[str] = (),
    compat: Mapping[str, str] | None = None,
    meta: Mapping[str, str] | None = None,
    format: int = FORMAT_VERSION,
) -> Manifest:
    """A validated manifest with its entries in canonical (sorted) order. Format 2 lists
    the packs its chunks name; format 1 (for tests and tools) has neither packs nor mtimes."""
    ordered = tuple(sorted(files, key=lambda f: f.path))
    packs = sorted(
        {(c.packed.pack, c.packed.pack_size) for f in ordered for c in f.chunks if c.packed}
    )
    m = Manifest(
        chunk_size=chunk_size,
        files=ordered,
        symlinks=tuple(sorted(symlinks, key=lambda s: s.path)),
        dirs=tuple(sorted(dirs)),
        compat=dict(sorted((compat or {}).items())),
        meta=dict(sorted((meta or {}).items())),
        format=format,
        packs=tuple(packs),
    )
    validate(m)
    return m


def encode(m: Manifest) -> bytes:
    """The manifest's canonical bytes: msgpack of one map, its keys in sorted order. Packed
    a file at a time: the whole document as dicts and lists first held ~50 MB for 100,000
    files beside the entries, the peak of a publish. The packer's buffer is copied out every
    _ENCODE_RUN files into one that grows by an eighth: one packer's buffer for it all, grown
    by doubling and copied out at the end, held 2.5x the bytes (10 -> 25 MB at 100,000)."""
    where = {p: i for i, (p, _) in enumerate(m.packs)}
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    out = io.BytesIO()  # (getvalue hands its buffer over: no copy)

    def flush() -> None:
        out.write(packer.getbuffer())
        packer.reset()

    packer.pack_map_header(7 if m.format == 1 else 8)
    packer.pack("chunk_size")
    packer.pack(m.chunk_size)
    packer.pack("compat")
    packer.pack(dict(sorted(m.compat.items())))
    packer.pack("dirs")
    packer.pack(list(m.dirs))
    packer.pack("files")
    packer.pack_array_header(len(m.files))
    doc = _file_doc_v1 if m.format == 1 else partial(_file_doc, where=where)
    for i, f in enumerate(m.files):
        packer.pack(doc(f))
        if i % _ENCODE_RUN == _ENCODE_RUN - 1:
            flush()
    packer.pack("format")
    packer.pack(m.format)
    packer.pack("meta")
    packer.pack(dict(sorted(m.meta.items())))
    if m.format != 1:
        packer.pack("packs")
        packer.pack([[p, size] for p, size in m.packs])
    packer.pack("symlinks")
    packer.pack([{"path": s.path, "target": s.target} for s in m.symlinks])
    flush()
    return out.getvalue()


# Files packed into the packer's buffer before it is copied out (a few hundred KB at most).
_ENCODE_RUN = 1024


def _file_doc(f: FileEntry, where: Mapping[bytes, int]) -> dict[str, Any]:
    return {
        "chunks": [_chunk_doc(c, where) for c in f.chunks],
        "mode": f.mode,
        "mtime": f.mtime,
        "path": f.path,
        "size": f.size,
    }


def _file_doc_v1(f: FileEntry) -> dict[str, Any]:
    return {
        "chunks": [[c.id, c.size, c.codec] for c in f.chunks],
        "mode": f.mode,
        "path": f.path,
        "size": f.size,
    }


def _chunk_doc(c: Chunk, where: Mapping[bytes, int]) -> list[Any]:
    if c.packed is None:
        return [c.id, c.size, c.codec]
    # A pack missing from `packs` fails validate; here it must not raise a KeyError.
    return [c.id, c.size, c.codec, where.get(c.packed.pack, -1), c.packed.offset, c.packed.length]


def decode(data: bytes, *, keep_bytes: bool = False, expect_id: str | None = None) -> Manifest:
    """Decode and validate manifest bytes; anything off raises ManifestError saying what.

    The bytes are the manifest's canonical encoding (checked), so its id is their hash: not
    encoded again for it (half a second and ~60 MB for 100,000 files). `keep_bytes`: they
    are its `encoded` too, until the caller drops them (a manifest to be written out).
    `expect_id`: the id they must hash to, checked before anything is decoded (bytes from
    elsewhere: a damaged or hostile manifest costs a hash, not a decode)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    snapshot_id = blake3.blake3(data).hexdigest()
    if expect_id is not None and snapshot_id != expect_id:
        raise ManifestError(f"manifest does not hash to its id {expect_id}")
    m, canonical = _read(data)
    validate(m)
    if not canonical:  # said last: what is wrong with the content says more
        raise ManifestError(_NOT_CANONICAL)
    m.__dict__["snapshot_id"] = snapshot_id  # (the cached properties)
    if keep_bytes:
        m.__dict__["encoded"] = bytes(data)
    return m


def _read(data: bytes) -> tuple[Manifest, bool]:
    """The manifest in `data`, read a value at a time, and whether every value's bytes are
    msgpack's own encoding of it (canonical form: `decode` takes only what `encode` makes).

    The files are read last, one at a time, each made a FileEntry before the next is read:
    a manifest of 100,000 files decoded whole held its msgpack document (~60 MB of dicts and
    lists) beside the entries made of it. They come first in the bytes (keys are sorted), so
    a first pass skips over them, and the format and packs they need are read first."""
    r = _Reader(data)
    top: dict[Any, Any] = {}
    files_at: tuple[int, int] | None = None  # where the files' array starts, and its length
    n = r.map_header("manifest")
    prev: str | None = None
    for _ in range(n):
        key = r.key()
        if isinstance(key, str) and prev is not None and key <= prev:
            r.canonical = False  # out of order, or repeated
        prev = key if isinstance(key, str) else prev
        if key not in _TOP_KEYS:  # refused before its value is built (it could be anything)
            raise ManifestError(f"manifest keys [{key!r}, ...] are not {sorted(_TOP_KEYS)}")
        if key == "files" and r.next_is_array():
            files_at = r.skip_array()
            top[key] = None
        elif key in _ITEMS and r.next_is_array():
            # Each item checked as it is read: 8 MiB of empty arrays for dirs took 600 MB.
            top[key] = r.items(_ITEMS[key]())
        elif key in ("compat", "meta") and r.next_is_map():
            top[key] = r.scalar_map(key)
        else:
            top[key] = r.value()
    r.end()
    fmt = top.get("format")
    if not _is_int(fmt) or fmt not in READABLE_FORMATS:  # 1.0 and True == 1: not canonical
        raise ManifestError(
            f"manifest format {fmt!r} is not supported (this hostd reads "
            f"{', '.join(map(str, READABLE_FORMATS))})"
        )
    keys = {"chunk_size", "compat", "dirs", "files", "format", "meta", "symlinks"}
    file_keys = {"chunks", "mode", "path", "size"}
    if fmt >= 2:
        keys.add("packs")
        file_keys.add("mtime")
    if set(top) != keys:
        raise ManifestError(f"manifest keys {sorted(top, key=repr)} are not {sorted(keys)}")
    packs = []
    for i, p in enumerate(_list(top.get("packs", []), "packs")):
        if not (isinstance(p, list) and len(p) == 2):
            raise ManifestError(f"packs[{i}] is not [id, size]")
        packs.append((p[0], p[1]))
    compat, meta = _map(top["compat"], "compat"), _map(top["meta"], "meta")
    symlinks = []
    for i, sm in enumerate(_list(top["symlinks"], "symlinks")):
        _map(sm, f"symlinks[{i}]")
        if set(sm) != {"path", "target"}:
            raise ManifestError(f"symlinks[{i}] has keys {sorted(sm, key=repr)}")
        symlinks.append(Symlink(sm["path"], sm["target"]))
    for m in (compat, meta, *top["symlinks"]):
        if list(m) != sorted(m):
            r.canonical = False
    if files_at is None:
        _list(top["files"], "files")  # (not an array: this raises)
        files_at = (0, 0)
    # Messages are formatted only on failure: a manifest has 100,000 files to go through.
    # A decoded manifest of 100,000 files is kept for reuse (snapshots.py), so equal numbers
    # are one object where that is free: a mode (a few values in a tree), and a one-chunk
    # file's size, its chunk's and its packed length (28 bytes each, a third of a small
    # file's integers). Only ints are shared: True == 1, but must stay what it was.
    files = []
    file_order = sorted(file_keys)  # (canonical: keys sorted)
    modes: dict[int, int] = {}
    npacks = len(packs)
    i = -1
    for batch in r.runs_at(*files_at):
        for fm in batch:
            i += 1
            if type(fm) is not dict or fm.keys() != file_keys:
                _map(fm, f"files[{i}]")
                raise ManifestError(f"files[{i}] has keys {sorted(fm, key=repr)}")
            if list(fm) != file_order:
                r.canonical = False
            cl = fm["chunks"]
            if type(cl) is not list:
                raise ManifestError(f"files[{i}].chunks is not a list")
            size, mode = fm["size"], fm["mode"]
            if type(mode) is int:
                mode = modes.setdefault(mode, mode)
            if type(size) is not int:
                size = None  # (validate says what is wrong with it)
            chunks = []
            for j, c in enumerate(cl):
                if type(c) is list and len(c) == 3:
                    chunks.append(Chunk(c[0], _same(c[1], size), c[2]))
                elif (
                    fmt >= 2
                    and type(c) is list
                    and len(c) == 6
                    and _is_int(k := c[3])
                    and 0 <= k < npacks
                ):  # a packed chunk
                    csize = _same(c[1], size)
                    pack, pack_size = packs[k]
                    chunks.append(
                        Chunk(c[0], csize, c[2], Packed(pack, c[4], _same(c[5], csize), pack_size))
                    )
                else:
                    chunks.append(_chunk_from(c, packs, fmt, i, j, size))
            files.append(
                FileEntry(
                    fm["path"],
                    mode,
                    fm["size"] if size is None else size,
                    tuple(chunks),
                    fm.get("mtime"),
                )
            )
    m = Manifest(
        chunk_size=top["chunk_size"],
        files=tuple(files),
        symlinks=tuple(symlinks),
        dirs=tuple(_list(top["dirs"], "dirs")),
        compat=compat,
        meta=meta,
        format=fmt,
        packs=tuple(packs),
    )
    return m, r.canonical


_NOT_CANONICAL = "manifest is not in canonical form (re-encoding differs)"
RUN = 512  # files read, then checked canonical, at a time: ~60 KiB of msgpack
_UNPACK_OPTIONS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "use_list": True,
    "max_bin_len": HASH_LEN,
}


_TOP_KEYS = frozenset(
    {"chunk_size", "compat", "dirs", "files", "format", "meta", "packs", "symlinks"}
)


def _dir_items() -> Callable[[int, Any], None]:
    """A check of each dir as it is read: a path, after the one before."""
    prev = [""]

    def check(i: int, d: Any) -> None:
        check_path(d, "dir")
        if d <= prev[0]:
            raise ManifestError(f"dir {d!r} is out of order or repeated")
        prev[0] = d

    return check


def _symlink_items() -> Callable[[int, Any], None]:
    """A check of each symlink as it is read: {path, target}, its path after the last."""
    prev = [""]

    def check(i: int, sm: Any) -> None:
        _map(sm, f"symlinks[{i}]")
        if set(sm) != {"path", "target"}:
            raise ManifestError(f"symlinks[{i}] has keys {sorted(sm, key=repr)}")
        check_path(sm["path"], "symlink")
        if sm["path"] <= prev[0]:
            raise ManifestError(f"symlink {sm['path']!r} is out of order or repeated")
        prev[0] = sm["path"]

    return check


def _pack_items() -> Callable[[int, Any], None]:
    def check(i: int, p: Any) -> None:
        if not (isinstance(p, list) and len(p) == 2):
            raise ManifestError(f"packs[{i}] is not [id, size]")

    return check


# The top-level lists read an item at a time (files aside), with the check of each.
_ITEMS: dict[str, Callable[[], Callable[[int, Any], None]]] = {
    "dirs": _dir_items,
    "symlinks": _symlink_items,
    "packs": _pack_items,
}


class _Reader:
    """msgpack values read one at a time from `data`, each checked to be encoded as msgpack
    encodes it; anything that is not msgpack is "not valid msgpack"."""

    def __init__(self, data: bytes) -> None:
        self.canonical = True  # every value read so far is encoded as msgpack encodes it
        self._data = data
        self._view = memoryview(data)
        self._u = self._unpacker(0)
        self._packer = msgpack.Packer(use_bin_type=True)  # (one a reader: not shared)

    def _unpacker(self, at: int) -> msgpack.Unpacker:
        stream = io.BytesIO(self._data)  # (shares the bytes: no copy)
        stream.seek(at)
        self._base = at
        return msgpack.Unpacker(stream, max_buffer_size=len(self._data), **_UNPACK_OPTIONS)

    def _at(self) -> int:
        return self._base + int(self._u.tell())

    def map_header(self, what: str) -> int:
        at = self._at()
        if self._data[at : at + 1] and not _is_map_marker(self._data[at]):
            self._call(self._u.unpack)  # what is not msgpack is said first
            self.end()
            raise ManifestError(f"{what} is not a map")
        n = self._call(self._u.read_map_header)
        self._canonical(at, self._packer.pack_map_header(n))
        return int(n)

    def next_is_array(self) -> bool:
        at = self._at()
        return bool(self._data[at : at + 1]) and _is_array_marker(self._data[at])

    def next_is_map(self) -> bool:
        at = self._at()
        return bool(self._data[at : at + 1]) and _is_map_marker(self._data[at])

    def items(self, check: Callable[[int, Any], None]) -> list[Any]:
        """The array that comes next, each item read and `check`ed before the next."""
        at = self._at()
        n = self._call(self._u.read_array_header)
        self._canonical(at, self._packer.pack_array_header(n))
        out = []
        for i in range(n):
            v = self.value()
            check(i, v)
            out.append(v)
        return out

    def scalar_map(self, what: str) -> dict[Any, Any]:
        """The map that comes next, of keys and values that are no list or map (a fact's,
        a meta field's), each pair checked as it is read."""
        at = self._at()
        n = self._call(self._u.read_map_header)
        self._canonical(at, self._packer.pack_map_header(n))
        out = {}
        for _ in range(n):
            k = self.key()
            v = self.value()
            if isinstance(v, (list, dict)):
                raise ManifestError(f"{what}[{k!r}] is a {type(v).__name__}, not a value")
            out[k] = v
        if len(out) != n:
            self.canonical = False  # a repeated key
        return out

    def skip_array(self) -> tuple[int, int]:
        """Skip over the array that comes next (structure checked, nothing built): where
        its first item starts, and how many it holds."""
        at = self._at()
        n = self._call(self._u.read_array_header)
        self._canonical(at, self._packer.pack_array_header(n))
        start = self._at()
        for _ in range(n):
            self._call(self._u.skip)
        return start, int(n)

    def key(self) -> Any:
        """A map's key: a string or bytes (msgpack's strict_map_key), read as a value."""
        k = self.value()
        if type(k) not in (str, bytes):
            raise ManifestError(
                f"manifest is not valid msgpack: {type(k).__name__} is not allowed for map key"
            )
        return k

    def value(self) -> Any:
        at = self._at()
        v = self._call(self._u.unpack)
        self._canonical(at, self._packer.pack(v))
        return v

    def end(self) -> None:
        if self._at() != len(self._data):
            raise ManifestError(
                f"manifest is not valid msgpack: {len(self._data) - self._at()} bytes after its end"
            )

    def runs_at(self, start: int, n: int) -> Iterator[list[Any]]:
        """The `n` values from byte `start` on (an array's items skipped over before), RUN at
        a time: each run's bytes are checked against one packing of the run (a call per
        value cost a fifth of a decode). A run cut short by bytes that are not msgpack is
        given first, then that is raised, as reading a value at a time would."""
        if n:
            self._u = self._unpacker(start)
        unpack = self._u.unpack
        while n:
            at = self._at()
            run: list[Any] = []
            try:
                for _ in range(min(n, RUN)):
                    run.append(unpack())
            except Exception as e:  # msgpack raises several unrelated types for bad input
                if run:
                    self._canonical_run(at, run)
                    yield run
                raise ManifestError(f"manifest is not valid msgpack: {e}") from e
            self._canonical_run(at, run)
            n -= len(run)
            yield run

    def _canonical_run(self, at: int, run: list[Any]) -> None:
        """`_canonical` for values read one after another from `at`: packed as an array, they
        are the array's header, then each one's own packing."""
        if self.canonical:
            head = len(self._packer.pack_array_header(len(run)))
            self._canonical(at, self._packer.pack(run)[head:])

    def _canonical(self, at: int, encoded: bytes) -> None:
        if self._view[at : self._at()] != encoded:
            self.canonical = False

    @staticmethod
    def _call(read: Any) -> Any:
        try:
            return read()
        except Exception as e:  # msgpack raises several unrelated types for bad input
            raise ManifestError(f"manifest is not valid msgpack: {e}") from e


def _is_map_marker(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)


def _is_array_marker(b: int) -> bool:
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


def _same(v: Any, like: int | None) -> Any:
    """`like` where `v` is an int equal to it (one object for both), else `v`."""
    return like if like is not None and type(v) is int and v == like else v


def _chunk_from(
    c: Any, packs: Sequence[tuple[Any, Any]], fmt: int, f: int, j: int, size: int | None
) -> Chunk:
    """A chunk entry that is not [id, size, codec] (_read takes those itself); `size`, the
    file's, to share with an equal chunk size."""
    what = f"files[{f}].chunks[{j}]"
    if fmt >= 2 and isinstance(c, list) and len(c) == 6:
        i, offset, length = c[3], c[4], c[5]
        if not _is_int(i) or not 0 <= i < len(packs):
            raise ManifestError(f"{what}: pack index {i!r} is not in packs")
        csize = _same(c[1], size)
        packed = Packed(packs[i][0], offset, _same(length, csize), packs[i][1])
        return Chunk(c[0], csize, c[2], packed)
    shape = "[id, size, codec] or [id, size, codec, pack, offset, length]"
    raise ManifestError(f"{what} is not {shape if fmt >= 2 else '[id, size, codec]'}")


def _map(v: Any, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{what} is not a map")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ManifestError(f"{what} is not a list")
    return v


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, which is an int to isinstance


# A path component that is empty, "." or "..": check_path refuses each.
_BAD_PART = re.compile(r"(?:^|/)\.{0,2}(?:/|$)")


def _plain_path(path: str) -> bool:
    """Whether check_path takes `path`, as one test for the common case: a path of at most
    a quarter of MAX_PATH_BYTES characters is within it (UTF-8 takes at most 4 bytes a
    character); a longer one is left to check_path."""
    return (
        0 < len(path) <= MAX_PATH_BYTES // 4
        and path[0] != "/"
        and "\x00" not in path
        and _BAD_PART.search(path) is None
    )


def check_path(path: Any, what: str) -> str:
    """A manifest path: relative, normalized, no '.', '..' or empty parts, no NUL."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{what}: path {path!r} is not a non-empty string")
    if "\x00" in path:
        raise ManifestError(f"{what}: path {path!r} contains a NUL byte")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise ManifestError(f"{what}: path is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise ManifestError(f"{what}: path {path!r} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ManifestError(f"{what}: path {path!r} has a {part or 'empty'!r} component")
    return path


def check_symlink_target(link_path: str, target: Any) -> None:
    """A target stays in the tree: leading '..' parts only, no deeper than the link's dir.

    Parents of entries are never symlinks (validate checks that), so the leading '..' walk
    real directories; the rest walks down, possibly through other symlinks that obey the
    same rule. So the target resolves inside the tree whichever way it is followed.
    """
    what = f"symlink {link_path!r}"
    if not isinstance(target, str) or not target:
        raise ManifestError(f"{what}: target {target!r} is not a non-empty string")
    if "\x00" in target:
        raise ManifestError(f"{what}: target contains a NUL byte")
    if target.startswith("/"):
        raise ManifestError(f"{what}: target {target!r} is absolute and leaves the tree")
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    if any(p in ("", ".", "..") for p in rest) or (not rest and ups == 0):
        raise ManifestError(f"{what}: target {target!r} is not in normal form")
    depth = link_path.count("/")
    if ups > depth:
        raise ManifestError(f"{what}: target {target!r} points outside the tree")


def validate(m: Manifest) -> None:
    """Raise ManifestError unless `m` is well-formed and safe to materialize."""
    if not _is_int(m.format) or m.format not in READABLE_FORMATS:
        raise ManifestError(f"manifest format {m.format!r} is not supported")
    if m.format == 1 and m.packs:
        raise ManifestError("a format 1 manifest has no packs")
    prev_pack = b""
    for p, size in m.packs:
        if not isinstance(p, bytes) or len(p) != HASH_LEN:
            raise ManifestError(f"pack id {p!r} is not {HASH_LEN} bytes")
        if p <= prev_pack:
            raise ManifestError(f"pack {p.hex()} is out of order or repeated")
        if not _is_int(size) or not 1 <= size <= MAX_MTIME:
            raise ManifestError(f"pack {p.hex()}: size {size!r} is not a positive integer")
        prev_pack = p
    cs = m.chunk_size
    if not _is_int(cs) or cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ManifestError(f"chunk_size {cs!r} is not a power of two in [64 KiB, 256 MiB]")
    for name, facts in (("compat", m.compat), ("meta", m.meta)):
        for k, v in facts.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ManifestError(f"{name} entry {k!r}: keys and values must be strings")
    for k in m.compat:
        if not FACT_NAME.fullmatch(k):
            raise ManifestError(f"compat fact name {k!r} is not [a-z][a-z0-9_]*")

    kinds: dict[str, str] = {}

    def claim(path: str, kind: str) -> None:
        if path in kinds:
            raise ManifestError(f"path {path!r} appears twice ({kinds[path]} and {kind})")
        kinds[path] = kind

    used: set[tuple[bytes, int]] = set()
    prev = ""
    for f in m.files:
        path = f.path
        if type(path) is not str or not _plain_path(path):
            check_path(path, "file")  # (says what is wrong, if anything is)
        if path <= prev:
            raise ManifestError(f"file {path!r} is out of order or repeated")
        prev = path
        kinds[path] = "file"  # (in order, so not there yet)
        _check_file(f, cs, m.format, used)
    if used != set(m.packs):
        raise ManifestError(
            f"packs lists {len(m.packs)} packs, but the chunks name {len(used)} (id, size) pairs"
        )
    prev = ""
    for s in m.symlinks:
        check_path(s.path, "symlink")  # first: an empty or non-string path is not "out of order"
        if s.path <= prev:
            raise ManifestError(f"symlink {s.path!r} is out of order or repeated")
        prev = s.path
        claim(s.path, "symlink")
        check_symlink_target(s.path, s.target)
    prev = ""
    for d in m.dirs:
        check_path(d, "dir")
        if d <= prev:
            raise ManifestError(f"dir {d!r} is out of order or repeated")
        prev = d
        claim(d, "dir")
    # No entry may sit under a file or a symlink: materializing it would write elsewhere.
    clear: set[str] = set()  # parents already walked up to the top
    for path in kinds:
        parent = path.rpartition("/")[0]
        while parent and parent not in clear:
            kind = kinds.get(parent)
            if kind is not None and kind != "dir":
                raise ManifestError(f"path {path!r} is inside {kind} {parent!r}")
            clear.add(parent)
            parent = parent.rpartition("/")[0]


def _check_file(f: FileEntry, chunk_size: int, fmt: int, used: set[tuple[bytes, int]]) -> None:
    if fmt == 1:
        if f.mtime is not None:
            raise ManifestError(f"file {f.path!r}: a format 1 manifest records no mtime")
    elif type(f.mtime) is not int or not MIN_MTIME <= f.mtime <= MAX_MTIME:
        raise ManifestError(
            f"file {f.path!r}: mtime {f.mtime!r} is not a signed 64-bit nanosecond count"
        )
    if type(f.mode) is not int or not 0 <= f.mode <= 0o777:
        raise ManifestError(f"file {f.path!r}: mode {f.mode!r} is not in 0..0o777")
    if type(f.size) is not int or f.size < 0:
        raise ManifestError(f"file {f.path!r}: size {f.size!r} is not a non-negative integer")
    expected = -(-f.size // chunk_size)
    if len(f.chunks) != expected:
        raise ManifestError(
            f"file {f.path!r}: {len(f.chunks)} chunks for {f.size} bytes, want {expected}"
        )
    last = expected - 1
    for i, c in enumerate(f.chunks):
        want = chunk_size if i < last else f.size - chunk_size * last
        if (
            type(c.id) is not bytes
            or len(c.id) != HASH_LEN
            or type(c.size) is not int
            or c.size != want
            or type(c.codec) is not int
            or c.codec not in CODECS
        ):
            _chunk_problem(f, i, c, want)
        p = c.packed
        if p is not None:
            if fmt == 1 or not _packed_ok(p, c.size):
                _check_packed(c, fmt, f"file {f.path!r}: chunk {i}")  # (says what)
            used.add((p.pack, p.pack_size))


def _chunk_problem(f: FileEntry, i: int, c: Chunk, want: int) -> None:
    what = f"file {f.path!r}: chunk {i}"
    if not isinstance(c.id, bytes) or len(c.id) != HASH_LEN:
        raise ManifestError(f"{what} id is not {HASH_LEN} bytes")
    if not _is_int(c.size) or c.size != want:
        raise ManifestError(f"{what} size {c.size!r}, want {want}")
    raise ManifestError(f"{what} codec {c.codec!r} is unknown")


def _packed_ok(p: Packed, size: int) -> bool:
    """_check_packed's rules for a format 2 chunk, as one test (a call a chunk: 100,000 of
    them in a compile cache's manifest); _check_packed says which one failed."""
    return (
        type(p.pack) is bytes
        and len(p.pack) == HASH_LEN
        and type(p.offset) is int
        and 0 <= p.offset <= MAX_MTIME
        and type(p.length) is int
        and 1 <= p.length <= max_stored_size(size)
        and (type(p.pack_size) is not int or p.offset + p.length <= p.pack_size)
    )


def _check_packed(c: Chunk, fmt: int, what: str) -> None:
    p = c.packed
    assert p is not None
    if fmt == 1:
        raise ManifestError(f"{what}: a format 1 manifest has no packed chunks")
    if not isinstance(p.pack, bytes) or len(p.pack) != HASH_LEN:
        raise ManifestError(f"{what}: pack id is not {HASH_LEN} bytes")
    if not _is_int(p.offset) or not 0 <= p.offset <= MAX_MTIME:
        raise ManifestError(f"{what}: pack offset {p.offset!r} is not a non-negative integer")
    # The stored bytes are raw (exactly size) or a zstd frame within the format's bound
    # (section 5): a length outside that range cannot verify, and a reader would be told to
    # fetch more than a chunk may be.
    if not _is_int(p.length) or not 1 <= p.length <= max_stored_size(c.size):
        raise ManifestError(
            f"{what}: stored length {p.length!r} is not in 1..{max_stored_size(c.size)}"
        )
    if _is_int(p.pack_size) and p.offset + p.length > p.pack_size:
        raise ManifestError(f"{what}: bytes {p.offset}+{p.length} end past its pack's size")

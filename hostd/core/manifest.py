"""The manifest: a snapshot's table of contents, its canonical encoding and its validation.

The snapshot id is the BLAKE3 of the canonical msgpack bytes, so `decode` accepts only bytes
that `encode` would produce: maps with sorted string keys, no floats, the shortest integer
forms, ids as 32-byte bin. Validation makes a decoded manifest safe to materialize: every
path is relative and stays inside the target, no path passes through a file or a symlink,
and every symlink resolves inside the tree however its components are followed.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import blake3
import msgpack

from hostd.core.ids import HASH_LEN, file_digest
from hostd.errors import ManifestError

FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)
MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 256 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_PATH_BYTES = 4096
_FACT_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True)
class Chunk:
    id: bytes
    size: int
    codec: int = CODEC_RAW


@dataclass(frozen=True)
class FileEntry:
    path: str
    mode: int
    size: int
    chunks: tuple[Chunk, ...]

    @cached_property
    def digest(self) -> bytes:
        """The blob this file's content is cached as."""
        return file_digest((c.id, c.size) for c in self.chunks)

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
) -> Manifest:
    """A validated manifest with its entries in canonical (sorted) order."""
    m = Manifest(
        chunk_size=chunk_size,
        files=tuple(sorted(files, key=lambda f: f.path)),
        symlinks=tuple(sorted(symlinks, key=lambda s: s.path)),
        dirs=tuple(sorted(dirs)),
        compat=dict(sorted((compat or {}).items())),
        meta=dict(sorted((meta or {}).items())),
    )
    validate(m)
    return m


def encode(m: Manifest) -> bytes:
    doc = {
        "chunk_size": m.chunk_size,
        "compat": dict(sorted(m.compat.items())),
        "dirs": list(m.dirs),
        "files": [
            {
                "chunks": [[c.id, c.size, c.codec] for c in f.chunks],
                "mode": f.mode,
                "path": f.path,
                "size": f.size,
            }
            for f in m.files
        ],
        "format": m.format,
        "meta": dict(sorted(m.meta.items())),
        "symlinks": [{"path": s.path, "target": s.target} for s in m.symlinks],
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def decode(data: bytes) -> Manifest:
    """Decode and validate manifest bytes; anything off raises ManifestError saying what."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        doc = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, max_bin_len=HASH_LEN
        )
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ManifestError(f"manifest is not valid msgpack: {e}") from e
    m = _from_doc(doc)
    validate(m)
    if encode(m) != data:
        raise ManifestError("manifest is not in canonical form (re-encoding differs)")
    return m


def _from_doc(doc: Any) -> Manifest:
    top = _map(doc, "manifest")
    keys = {"chunk_size", "compat", "dirs", "files", "format", "meta", "symlinks"}
    if set(top) != keys:
        raise ManifestError(f"manifest keys {sorted(top, key=repr)} are not {sorted(keys)}")
    fmt = top["format"]
    if not _is_int(fmt) or fmt != FORMAT_VERSION:  # 1.0 and True == 1, but are not canonical
        raise ManifestError(f"manifest format {fmt!r} is not supported (this hostd reads 1)")
    files = []
    for i, f in enumerate(_list(top["files"], "files")):
        fm = _map(f, f"files[{i}]")
        if set(fm) != {"chunks", "mode", "path", "size"}:
            raise ManifestError(f"files[{i}] has keys {sorted(fm, key=repr)}")
        chunks = []
        for j, c in enumerate(_list(fm["chunks"], f"files[{i}].chunks")):
            if not (isinstance(c, list) and len(c) == 3):
                raise ManifestError(f"files[{i}].chunks[{j}] is not [id, size, codec]")
            chunks.append(Chunk(c[0], c[1], c[2]))
        files.append(FileEntry(fm["path"], fm["mode"], fm["size"], tuple(chunks)))
    symlinks = []
    for i, s in enumerate(_list(top["symlinks"], "symlinks")):
        sm = _map(s, f"symlinks[{i}]")
        if set(sm) != {"path", "target"}:
            raise ManifestError(f"symlinks[{i}] has keys {sorted(sm, key=repr)}")
        symlinks.append(Symlink(sm["path"], sm["target"]))
    return Manifest(
        chunk_size=top["chunk_size"],
        files=tuple(files),
        symlinks=tuple(symlinks),
        dirs=tuple(_list(top["dirs"], "dirs")),
        compat=_map(top["compat"], "compat"),
        meta=_map(top["meta"], "meta"),
        format=fmt,
    )


def _map(v: Any, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"{what} is not a map")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ManifestError(f"{what} is not a list")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    if not _is_int(m.format) or m.format != FORMAT_VERSION:
        raise ManifestError(f"manifest format {m.format!r} is not supported")
    cs = m.chunk_size
    if not _is_int(cs) or cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ManifestError(f"chunk_size {cs!r} is not a power of two in [64 KiB, 256 MiB]")
    for name, facts in (("compat", m.compat), ("meta", m.meta)):
        for k, v in facts.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ManifestError(f"{name} entry {k!r}: keys and values must be strings")
    for k in m.compat:
        if not _FACT_RE.fullmatch(k):
            raise ManifestError(f"compat fact name {k!r} is not [a-z][a-z0-9_]*")

    kinds: dict[str, str] = {}

    def claim(path: str, kind: str) -> None:
        if path in kinds:
            raise ManifestError(f"path {path!r} appears twice ({kinds[path]} and {kind})")
        kinds[path] = kind

    prev = ""
    for f in m.files:
        check_path(f.path, "file")
        if f.path <= prev:
            raise ManifestError(f"file {f.path!r} is out of order or repeated")
        prev = f.path
        claim(f.path, "file")
        _check_file(f, cs)
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
    for path in kinds:
        parent = posixpath.dirname(path)
        while parent:
            kind = kinds.get(parent)
            if kind is not None and kind != "dir":
                raise ManifestError(f"path {path!r} is inside {kind} {parent!r}")
            parent = posixpath.dirname(parent)


def _check_file(f: FileEntry, chunk_size: int) -> None:
    what = f"file {f.path!r}"
    if not _is_int(f.mode) or not 0 <= f.mode <= 0o777:
        raise ManifestError(f"{what}: mode {f.mode!r} is not in 0..0o777")
    if not _is_int(f.size) or f.size < 0:
        raise ManifestError(f"{what}: size {f.size!r} is not a non-negative integer")
    expected = -(-f.size // chunk_size)
    if len(f.chunks) != expected:
        raise ManifestError(f"{what}: {len(f.chunks)} chunks for {f.size} bytes, want {expected}")
    for i, c in enumerate(f.chunks):
        if not isinstance(c.id, bytes) or len(c.id) != HASH_LEN:
            raise ManifestError(f"{what}: chunk {i} id is not {HASH_LEN} bytes")
        want = chunk_size if i < expected - 1 else f.size - chunk_size * (expected - 1)
        if not _is_int(c.size) or c.size != want:
            raise ManifestError(f"{what}: chunk {i} size {c.size!r}, want {want}")
        if c.codec not in CODECS or not _is_int(c.codec):
            raise ManifestError(f"{what}: chunk {i} codec {c.codec!r} is unknown")

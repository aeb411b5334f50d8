"""The embedded index: SQLite (WAL) records of blobs, snapshots, the chunk map, refs, pins.

The tiers hold the bytes; the index remembers what they mean. Blob rows are read at start, in
batches (the cache keeps an in-memory view of them) and written through on every change;
snapshot rows are small summaries (the manifests themselves are files beside the index),
and the chunk map (chunk id -> blob, offset) is only ever queried per chunk, so neither costs
memory per chunk. The index is reconciled with the tiers at start, so a lost or stale index
costs a rescan, never a wrong byte.

Single-row statements run on the caller's thread (the event loop): WAL with
synchronous=NORMAL commits without an fsync, so each costs microseconds. Work proportional to
a manifest (its chunk rows, a restore's touches) goes to `later`, one writer thread that runs
jobs in order and writes in batches, each its own short transaction under the one lock, so a
statement from the loop waits at most one batch. `close` waits for the jobs queued.

A schema version is recorded. An older index is migrated in place, step by step (version 1:
pins, snapshots and refs kept, its blob rows get an unknown ctime, so each blob is re-hashed
before its first use; version 2: its snapshots are indexed again from their manifests at the
next load); one of any other version is moved aside and rebuilt from the tiers and the
manifests kept beside it.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from hostd.errors import HostdError, TierError
from hostd.lock import private_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

# A ctime no file has: the blob's bytes have not been verified since this record was made (an
# index migrated from version 1, or a blob found on disk with no row), so the next use
# re-hashes it.
UNKNOWN_CTIME = 0

# Blob rows read per query by blob_batches (Cache.load): a few hundred KiB of tuples.
LOAD_BATCH = 4096

# A blob row as stored (what blob_batches gives): digest, tier, size, chunk_size, complete
# (0 or 1), mtime_ns, last_used, ctime_ns, lent (0 or 1). BlobRow's fields, in that order.
BlobValues = tuple[bytes, str, int, int, int, int, float, int, int]

_SELECT_BLOBS = (
    "SELECT digest, tier, size, chunk_size, complete, mtime_ns, last_used, ctime_ns, lent"
    " FROM blobs"
)

# Rows written per transaction by bulk writes: small enough that a statement from the loop
# waiting for the lock waits about a millisecond.
BATCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs(
    digest BLOB NOT NULL, tier TEXT NOT NULL, size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL, complete INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    last_used REAL NOT NULL, ctime_ns INTEGER NOT NULL DEFAULT 0,
    lent INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(digest, tier)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(
    id TEXT PRIMARY KEY, manifest BLOB NOT NULL, last_used REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, chunk_size INTEGER, files INTEGER, bytes INTEGER,
    compat TEXT, blobs BLOB);
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB NOT NULL, blob BLOB NOT NULL, offset INTEGER NOT NULL,
    PRIMARY KEY(id, blob)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs(
    ref TEXT NOT NULL, compat TEXT NOT NULL, snapshot TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY(ref, compat)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ref_seen(
    ref TEXT NOT NULL, compat TEXT NOT NULL, snapshot TEXT NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY(ref, compat, snapshot)) WITHOUT ROWID;
"""
# ref_seen: every snapshot this host resolved a ref to (refs keeps only the last per compat
# key), for `hostd rm REF` and `prune --keep`. A table an older hostd ignores: no new version.
# snapshots.manifest: the manifest's bytes in a version-2 row, until the next load moves them
# to the manifests directory (empty since). snapshots.blobs: NULL until the snapshot's chunk
# rows are written (a load indexes such a row again); then packed (digest, size) entries.

# Each step takes an index of version N to N+1 in place: the columns to add (those it does
# not have yet), by table. New tables come from _SCHEMA.
_MIGRATIONS: dict[int, dict[str, dict[str, str]]] = {
    1: {
        "blobs": {
            "ctime_ns": "INTEGER NOT NULL DEFAULT 0",
            "lent": "INTEGER NOT NULL DEFAULT 0",
        }
    },
    2: {
        "snapshots": {
            "chunk_size": "INTEGER",
            "files": "INTEGER",
            "bytes": "INTEGER",
            "compat": "TEXT",
            "blobs": "BLOB",
        }
    },
}

_PACKED = struct.Struct(">32sQ")  # one blob of a snapshot: digest, size


def pack_blobs(blobs: Iterable[tuple[bytes, int]]) -> bytes:
    """A snapshot's distinct blobs, as stored in its row: (digest, size) entries."""
    return b"".join(_PACKED.pack(d, size) for d, size in blobs)


def unpack_blobs(packed: bytes) -> Iterator[tuple[bytes, int]]:
    return _PACKED.iter_unpack(packed)


@dataclass(slots=True)
class BlobRow:
    """A blob copy. size, mtime_ns and ctime_ns are the stat of its inode when its bytes were
    last verified (ctime UNKNOWN_CTIME: never); `lent`: linked into a tree whose owner could
    write to it (Cache.lent)."""

    digest: bytes
    tier: str
    size: int
    chunk_size: int
    complete: bool
    mtime_ns: int
    last_used: float
    ctime_ns: int = UNKNOWN_CTIME
    lent: bool = False


@dataclass(slots=True)
class SnapshotRow:
    """A snapshot's summary. `indexed`: its chunk rows and blob list are written (False: a
    version-2 row, or a daemon that stopped before its writer got to it)."""

    id: str
    last_used: float
    pinned: bool
    chunk_size: int = 0
    files: int = 0
    bytes: int = 0
    compat: Mapping[str, str] = field(default_factory=dict)
    indexed: bool = False


T = TypeVar("T")


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rebuilt = False
        self.closed = False
        private_dir(path.parent)  # the index and manifests are the daemon's alone
        # One connection, shared by the loop and the writer thread: the lock keeps their
        # statements (and the writer's transactions) from interleaving.
        self._lock = threading.RLock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hostd-index")
        try:
            self._start(path)
        except sqlite3.Error as e:
            self._writer.shutdown(wait=False)
            with contextlib.suppress(Exception):
                self.db.close()
            raise HostdError(
                f"index ({path}): cannot open it: {_cause(e)}; if it is damaged, move it "
                f"aside (with its -wal and -shm files) and hostd rebuilds it from the tiers"
            ) from e

    def _start(self, path: Path) -> None:
        self.db = self._open()
        version = self._version()
        if version is not None and version < SCHEMA_VERSION and self._migrate(version):
            version = SCHEMA_VERSION
        if version is not None and version != SCHEMA_VERSION:
            # Another schema: move it aside (kept for inspection) and start empty; the cache
            # rebuilds it from the tiers and the manifests directory.
            self.db.close()
            os.replace(path, path.with_name(f"{path.name}.v{version}.old"))
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(path) + suffix)
            self.db = self._open()
            self.rebuilt = True
        elif version is None:
            self.rebuilt = True
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r})"

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    def _migrate(self, version: int) -> bool:
        """Bring an older index up to this version in place; False if no path leads here."""
        if any(v not in _MIGRATIONS for v in range(version, SCHEMA_VERSION)):
            return False
        with self._tx() as db:
            for v in range(version, SCHEMA_VERSION):
                for table, columns in _MIGRATIONS[v].items():
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    for name, decl in columns.items():
                        if name not in have:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        return True

    def _version(self) -> int | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        return int(row[0]) if row else None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self.db.execute("BEGIN")
                try:
                    yield self.db
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):  # (a failed one may be gone)
                        self.db.execute("ROLLBACK")
                    raise
                try:
                    self.db.execute("COMMIT")
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                # Named, as a tier's write errors are: not an `internal error`.
                raise TierError(f"index ({self.path}): writing failed: {_cause(e)}") from e

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def _first(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self.db.execute(sql, args).fetchone()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self.db.execute(sql, args).rowcount

    def _batched(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        it = iter(rows)
        while batch := list(islice(it, BATCH)):
            with self._tx() as db:
                db.executemany(sql, batch)

    # the writer thread
    def later(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on the writer thread, after the jobs queued before it. A job that
        fails is logged (and its future holds the error)."""

        def job() -> T:
            try:
                return fn(*args)
            except BaseException:
                log.exception("index job %s failed", getattr(fn, "__name__", fn))
                raise

        return self._writer.submit(job)

    def flush(self) -> None:
        """Wait for the jobs queued so far (blocking)."""
        self.later(lambda: None).result()

    def close(self) -> None:
        """Finish the queued jobs, then close."""
        if self.closed:
            return
        self._writer.shutdown(wait=True)
        with self._lock:
            self.closed = True
            self.db.close()

    # blobs
    def blobs(self) -> list[BlobRow]:
        return [
            BlobRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], bool(r[8]))
            for rows in self.blob_batches()
            for r in rows
        ]

    def blob_batches(self, size: int = LOAD_BATCH) -> Iterator[list[BlobValues]]:
        """Every blob row as it is stored (BlobValues: no object per row), in table order,
        `size` rows at a time, so that a million rows cost one batch of memory. One statement
        stays open throughout; the lock is held per batch only (a row written meanwhile may or
        may not be seen)."""
        with self._lock:
            cur = self.db.execute(_SELECT_BLOBS)
        try:
            while True:
                with self._lock:
                    rows: list[BlobValues] = cur.fetchmany(size)
                if not rows:
                    return
                yield rows
        finally:
            with self._lock:
                cur.close()

    def put_blob(self, row: BlobRow) -> None:
        self._exec(_PUT_BLOB, _blob_values(row))

    def put_blobs(self, rows: Iterable[BlobRow]) -> None:
        """Write blob rows in one transaction (one commit for a whole snapshot's blobs)."""
        with self._tx() as db:
            db.executemany(_PUT_BLOB, (_blob_values(r) for r in rows))

    def delete_blob(self, digest: bytes, tier: str) -> None:
        self._exec("DELETE FROM blobs WHERE digest=? AND tier=?", (digest, tier))

    def delete_blobs(self, keys: Iterable[tuple[bytes, str]]) -> None:
        """Delete blob rows by (digest, tier), in batches."""
        self._batched("DELETE FROM blobs WHERE digest=? AND tier=?", keys)

    def touch_blobs(self, digests: Iterable[bytes], when: float) -> None:
        self._batched(
            "UPDATE blobs SET last_used=? WHERE digest=?", ((when, d) for d in _in_order(digests))
        )

    # snapshots
    def snapshots(self) -> list[SnapshotRow]:
        rows = self._all(
            "SELECT id, last_used, pinned, chunk_size, files, bytes, compat, blobs IS NOT NULL"
            " FROM snapshots"
        )
        return [
            SnapshotRow(
                r[0],
                r[1],
                bool(r[2]),
                r[3] or 0,
                r[4] or 0,
                r[5] or 0,
                json.loads(r[6]) if r[6] else {},
                bool(r[7]),
            )
            for r in rows
        ]

    def put_snapshot(self, s: SnapshotRow) -> None:
        """Record a snapshot not indexed yet (`index_snapshot` does that); if it is known,
        only its last use changes."""
        self._exec(
            "INSERT INTO snapshots(id, manifest, last_used, pinned, chunk_size, files, bytes,"
            " compat) VALUES(?,x'',?,?,?,?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET last_used=excluded.last_used",
            (
                s.id,
                s.last_used,
                int(s.pinned),
                s.chunk_size,
                s.files,
                s.bytes,
                json.dumps(dict(s.compat), sort_keys=True),
            ),
        )

    def touch_snapshot(self, snapshot_id: str, when: float) -> None:
        self._exec("UPDATE snapshots SET last_used=? WHERE id=?", (when, snapshot_id))

    def index_snapshot(
        self, s: SnapshotRow, blobs: bytes, chunks: Iterable[tuple[bytes, bytes, int]]
    ) -> None:
        """Write a snapshot's chunk rows (chunk id, blob digest, offset), in batches, then
        its blob list and summary, which mark it indexed. The row must exist."""
        # In key order: each batch then changes a few neighbouring pages of the table, not
        # one page per row all over it (chunk ids are random).
        self._batched("INSERT OR IGNORE INTO chunks VALUES(?,?,?)", _in_order(chunks))
        self._exec(
            "UPDATE snapshots SET manifest=x'', chunk_size=?, files=?, bytes=?, compat=?,"
            " blobs=? WHERE id=?",
            (
                s.chunk_size,
                s.files,
                s.bytes,
                json.dumps(dict(s.compat), sort_keys=True),
                blobs,
                s.id,
            ),
        )

    def legacy_manifest(self, snapshot_id: str) -> bytes:
        """The manifest bytes a version-2 row holds (b"" if none)."""
        row = self._first("SELECT manifest FROM snapshots WHERE id=?", (snapshot_id,))
        return bytes(row[0]) if row else b""

    def snapshot_blobs(self, snapshot_id: str) -> bytes | None:
        """The packed blob list of an indexed snapshot (see unpack_blobs); None if not."""
        row = self._first("SELECT blobs FROM snapshots WHERE id=?", (snapshot_id,))
        return bytes(row[0]) if row and row[0] is not None else None

    def all_snapshot_blobs(self) -> Iterator[tuple[str, int, bytes]]:
        """(id, chunk size, packed blob list) of every indexed snapshot, one at a time."""
        ids = [r[0] for r in self._all("SELECT id FROM snapshots WHERE blobs NOT NULL")]
        for sid in ids:
            row = self._first("SELECT chunk_size, blobs FROM snapshots WHERE id=?", (sid,))
            if row is not None and row[1] is not None:
                yield sid, row[0], bytes(row[1])

    def set_pinned(self, snapshot_id: str, pinned: bool) -> bool:
        return (
            self._exec("UPDATE snapshots SET pinned=? WHERE id=?", (int(pinned), snapshot_id)) > 0
        )

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))
            db.execute("DELETE FROM refs WHERE snapshot=?", (snapshot_id,))
            db.execute("DELETE FROM ref_seen WHERE snapshot=?", (snapshot_id,))

    def unnamed_snapshots(self) -> list[str]:
        """Snapshots neither pinned nor named by a ref."""
        rows = self._all(
            "SELECT id FROM snapshots WHERE pinned=0"
            " AND id NOT IN (SELECT snapshot FROM refs) ORDER BY id"
        )
        return [str(r[0]) for r in rows]

    # the chunk map: where a local copy of a chunk may be
    def chunk_locations(self, cid: bytes) -> list[tuple[bytes, int]]:
        return self._all("SELECT blob, offset FROM chunks WHERE id=?", (cid,))

    def chunk_blobs(self, cids: Sequence[bytes]) -> dict[bytes, list[bytes]]:
        """The blobs holding each of `cids`, in queries of up to 500 ids."""
        out: dict[bytes, list[bytes]] = {}
        for i in range(0, len(cids), 500):
            part = cids[i : i + 500]
            marks = ",".join("?" * len(part))
            for cid, blob in self._all(
                f"SELECT id, blob FROM chunks WHERE id IN ({marks})", tuple(part)
            ):
                out.setdefault(cid, []).append(blob)
        return out

    def drop_chunks(self, rows: Iterable[tuple[bytes, bytes]]) -> None:
        """Delete chunk rows, by (chunk id, blob digest), in batches."""
        self._batched("DELETE FROM chunks WHERE id=? AND blob=?", _in_order(rows))

    def count_chunks(self) -> int:
        return int(self._first("SELECT count(*) FROM chunks")[0])

    # refs: the last resolution of each (ref, compat digest), used when the origin is down
    def put_ref(self, ref: str, compat: str, snapshot_id: str, when: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO refs VALUES(?,?,?,?)", (ref, compat, snapshot_id, when)
            )
            db.execute(
                "INSERT OR REPLACE INTO ref_seen VALUES(?,?,?,?)", (ref, compat, snapshot_id, when)
            )

    def ref_targets(self) -> list[tuple[str, str, float]]:
        """(ref, snapshot, when this host last resolved the ref to it), for every snapshot a
        ref was resolved to here and still known (now or before)."""
        rows = self._all(
            "SELECT ref, snapshot, max(seen) FROM (SELECT ref, snapshot, updated AS seen FROM refs"
            " UNION ALL SELECT ref, snapshot, seen FROM ref_seen) GROUP BY ref, snapshot"
            " ORDER BY ref, snapshot"
        )
        return [(str(r), str(sid), float(t)) for r, sid, t in rows]

    def get_ref(self, ref: str, compat: str) -> str | None:
        row = self._first("SELECT snapshot FROM refs WHERE ref=? AND compat=?", (ref, compat))
        return str(row[0]) if row else None

    def refs_of(self, snapshot_id: str) -> list[str]:
        rows = self._all(
            "SELECT DISTINCT ref FROM refs WHERE snapshot=? ORDER BY ref", (snapshot_id,)
        )
        return [str(r[0]) for r in rows]


S = TypeVar("S", bound=tuple[Any, ...] | bytes)

# Rows sorted at once, at most: a sort holds the GIL, and the loop waits for it meanwhile.
SORT_RUN = 4096


def _cause(e: sqlite3.Error) -> str:
    """An SQLite error in the words of os_cause, where it has them."""
    name = getattr(e, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return f"its filesystem is full ({e})"
    if name.startswith("SQLITE_READONLY"):
        return f"it is not writable ({e})"
    return str(e)


def _in_order(rows: Iterable[S]) -> Iterator[S]:
    """`rows` sorted, in runs merged as they are read, so no one sort holds the GIL long."""
    it = iter(rows)
    runs = []
    while run := list(islice(it, SORT_RUN)):
        run.sort()
        runs.append(run)
    return heapq.merge(*runs)


_PUT_BLOB = (
    "INSERT OR REPLACE INTO blobs(digest, tier, size, chunk_size, complete, mtime_ns,"
    " last_used, ctime_ns, lent) VALUES(?,?,?,?,?,?,?,?,?)"
)


def _blob_values(r: BlobRow) -> tuple[bytes, str, int, int, int, int, float, int, int]:
    return (
        r.digest,
        r.tier,
        r.size,
        r.chunk_size,
        int(r.complete),
        r.mtime_ns,
        r.last_used,
        r.ctime_ns,
        int(r.lent),
    )

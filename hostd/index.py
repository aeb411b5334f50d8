"""The embedded index: SQLite (WAL) records of blobs, chunk locations, snapshots, refs, pins.

The tiers hold the bytes; the index remembers what they mean. It is written through on every
change, read whole at start (the cache keeps an in-memory view), and reconciled with the
tiers at start, so a lost or stale index costs a rescan, never a wrong byte. Statements are
small and run on the caller's thread (the event loop): WAL with synchronous=NORMAL commits
without an fsync, so each call costs microseconds.

A schema version is recorded. An index of version 1 is migrated in place (pins, snapshots and
refs kept; its blob rows get an unknown ctime, so each blob is re-hashed before its first use);
one of any other version is moved aside and rebuilt from the tiers and the manifests kept
beside it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hostd.core import manifest as mf
from hostd.lock import private_dir

SCHEMA_VERSION = 2

# A ctime no file has: the blob's bytes have not been verified since this record was made (an
# index migrated from version 1, or a blob found on disk with no row), so the next use
# re-hashes it.
UNKNOWN_CTIME = 0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs(
    digest BLOB NOT NULL, tier TEXT NOT NULL, size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL, complete INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    last_used REAL NOT NULL, ctime_ns INTEGER NOT NULL DEFAULT 0,
    lent INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(digest, tier)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots(
    id TEXT PRIMARY KEY, manifest BLOB NOT NULL, last_used REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS refs(
    ref TEXT NOT NULL, compat TEXT NOT NULL, snapshot TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY(ref, compat)) WITHOUT ROWID;
"""

# Each step takes an index of version N to N+1 in place.
_MIGRATIONS = {
    1: """
ALTER TABLE blobs ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE blobs ADD COLUMN lent INTEGER NOT NULL DEFAULT 0;
""",
}


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
    id: str
    manifest: bytes
    last_used: float
    pinned: bool


class Index:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rebuilt = False
        private_dir(path.parent)  # the index and manifests are the daemon's alone
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
        with self.db:
            self.db.executescript(_SCHEMA)
            self.db.execute(
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
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
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
        self.db.execute("BEGIN")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # blobs
    def blobs(self) -> list[BlobRow]:
        rows = self.db.execute(
            "SELECT digest, tier, size, chunk_size, complete, mtime_ns, last_used, ctime_ns, lent"
            " FROM blobs"
        ).fetchall()
        return [
            BlobRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], bool(r[8])) for r in rows
        ]

    def put_blob(self, row: BlobRow) -> None:
        self.db.execute(_PUT_BLOB, _blob_values(row))

    def put_blobs(self, rows: Iterable[BlobRow]) -> None:
        """Write blob rows in one transaction (one commit for a whole snapshot's blobs)."""
        with self._tx() as db:
            db.executemany(_PUT_BLOB, (_blob_values(r) for r in rows))

    def delete_blob(self, digest: bytes, tier: str) -> None:
        self.db.execute("DELETE FROM blobs WHERE digest=? AND tier=?", (digest, tier))

    def touch_blobs(self, digests: Iterable[bytes], when: float) -> None:
        with self._tx() as db:
            db.executemany(
                "UPDATE blobs SET last_used=? WHERE digest=?", ((when, d) for d in digests)
            )

    # snapshots
    def snapshots(self) -> list[SnapshotRow]:
        rows = self.db.execute("SELECT id, manifest, last_used, pinned FROM snapshots").fetchall()
        return [SnapshotRow(r[0], r[1], r[2], bool(r[3])) for r in rows]

    def put_snapshot(self, m: mf.Manifest, when: float) -> None:
        self.db.execute(
            "INSERT INTO snapshots VALUES(?,?,?,0) "
            "ON CONFLICT(id) DO UPDATE SET last_used=excluded.last_used",
            (m.snapshot_id, m.encoded, when),
        )

    def set_pinned(self, snapshot_id: str, pinned: bool) -> bool:
        cur = self.db.execute(
            "UPDATE snapshots SET pinned=? WHERE id=?", (int(pinned), snapshot_id)
        )
        return cur.rowcount > 0

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))
            db.execute("DELETE FROM refs WHERE snapshot=?", (snapshot_id,))

    # refs: the last resolution of each (ref, compat digest), used when the origin is down
    def put_ref(self, ref: str, compat: str, snapshot_id: str, when: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO refs VALUES(?,?,?,?)", (ref, compat, snapshot_id, when)
        )

    def get_ref(self, ref: str, compat: str) -> str | None:
        row = self.db.execute(
            "SELECT snapshot FROM refs WHERE ref=? AND compat=?", (ref, compat)
        ).fetchone()
        return str(row[0]) if row else None

    def refs_of(self, snapshot_id: str) -> list[str]:
        rows = self.db.execute(
            "SELECT DISTINCT ref FROM refs WHERE snapshot=? ORDER BY ref", (snapshot_id,)
        ).fetchall()
        return [str(r[0]) for r in rows]


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

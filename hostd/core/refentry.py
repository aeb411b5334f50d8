"""Ref history entries: what a ref pointed at, in order (docs/FORMAT.md section 6). Pure.

Every time a ref is set under a compat key (a publish, a rollback) an entry is written at
`history/<ref>/<compat-digest>/<seq>`, `seq` one more than the highest there, so a ref's
sequence only ever goes up, a rollback included: it is a new entry naming an old id. The
entry holds its own ref, compat digest and seq, so an entry copied to another key (or, once
entries are signed, replayed) does not pass for that key's.

An entry is canonical msgpack, like a manifest (FORMAT.md section 3): one map with exactly
the keys `at`, `compat`, `ref`, `seq`, `snapshot`, in that order, shortest forms; `decode`
accepts only the bytes `encode` would write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

from hostd.core.ids import HASH_LEN

MAX_ENTRY_BYTES = 1024  # a 256-character ref, two ids and two ints fit in well under this
SEQ_DIGITS = 20  # the key's seq: zero-padded decimal, so keys sort as numbers do
MAX_SEQ = 2**64 - 1
_SEQ_NAME = re.compile(r"[0-9]{20}")


class EntryError(ValueError):
    """Bytes that are not a canonical ref history entry, or one for another key."""


@dataclass(frozen=True, slots=True)
class Entry:
    ref: str
    compat: str  # the compat digest, 64-hex
    seq: int  # 1, 2, ...: one more than the entry before it
    snapshot: str  # 64-hex
    at: int  # when it was written: seconds since the epoch (the writer's clock)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "snapshot": self.snapshot,
            "at": self.at,
            "compat_digest": self.compat,
        }


def seq_name(seq: int) -> str:
    """The last segment of an entry's key."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"a ref history seq is 1 to 2**64-1, got {seq}")
    return f"{seq:0{SEQ_DIGITS}d}"


def parse_seq_name(name: str) -> int | None:
    """The seq a key's last segment names, or None if it is not an entry's name."""
    if not _SEQ_NAME.fullmatch(name):
        return None
    seq = int(name)
    return seq if 1 <= seq <= MAX_SEQ else None


def encode(e: Entry) -> bytes:
    seq_name(e.seq)
    if e.at < 0:
        raise ValueError(f"an entry's time is not before 1970, got {e.at}")
    doc = {
        "at": e.at,
        "compat": bytes.fromhex(e.compat),
        "ref": e.ref,
        "seq": e.seq,
        "snapshot": bytes.fromhex(e.snapshot),
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def decode(data: bytes, *, ref: str, compat: str, seq: int) -> Entry:
    """The entry at `history/<ref>/<compat>/<seq>`; EntryError unless the bytes are a
    canonical entry for exactly that key."""
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"{len(data)} bytes, over the {MAX_ENTRY_BYTES} limit of an entry")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=HASH_LEN)
    except Exception as err:  # msgpack raises several unrelated types for bad input
        raise EntryError(f"not valid msgpack: {err}") from err
    if not isinstance(doc, dict) or set(doc) != {"at", "compat", "ref", "seq", "snapshot"}:
        raise EntryError("not a map of exactly at, compat, ref, seq, snapshot")
    for key in ("at", "seq"):
        if type(doc[key]) is not int:
            raise EntryError(f"{key!r} is not an int")
    for key in ("compat", "snapshot"):
        if not isinstance(doc[key], bytes) or len(doc[key]) != HASH_LEN:
            raise EntryError(f"{key!r} is not {HASH_LEN} bytes")
    if not isinstance(doc["ref"], str):
        raise EntryError("'ref' is not a string")
    try:
        e = Entry(doc["ref"], doc["compat"].hex(), doc["seq"], doc["snapshot"].hex(), doc["at"])
        canonical = encode(e)
    except ValueError as err:
        raise EntryError(str(err)) from err
    if canonical != data:
        raise EntryError("not in canonical form (re-encoding differs)")
    if (e.ref, e.compat, e.seq) != (ref, compat, seq):
        raise EntryError(
            f"it names ref {e.ref!r}, compat key {e.compat}, seq {e.seq}: not its own key"
        )
    return e

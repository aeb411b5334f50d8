"""Who owns a chunk: rendezvous (highest random weight) hashing over member names.

Every host ranks the members for a chunk id the same way, from the names alone ("ip:port"
as the membership lists them), so hosts that agree on the live members agree on each chunk's
owner with no coordination; when a member goes, only the chunks it owned move, each to the
member ranked next for it. A member's weight for a chunk is the first 8 bytes of
BLAKE3(member name || chunk id), read big-endian; ties (a 2^-64 event) go to the smaller name.
"""

from __future__ import annotations

from collections.abc import Iterable

import blake3


def weight(member: str, cid: bytes) -> int:
    return int.from_bytes(blake3.blake3(member.encode() + cid).digest(8), "big")


def rank(cid: bytes, members: Iterable[str]) -> list[str]:
    """`members` best first for chunk `cid`: the first is its owner."""
    return sorted(set(members), key=lambda m: (-weight(m, cid), m))


def owner(cid: bytes, members: Iterable[str]) -> str | None:
    """The member that owns `cid`, or None when there are no members."""
    best: tuple[int, str] | None = None
    for m in set(members):
        key = (-weight(m, cid), m)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]

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


class Placement:
    """Owners over one fixed set of members, remembered per chunk: a host asks for the owner
    of every chunk it fetches, and the set changes far less often than that."""

    def __init__(self, members: Iterable[str]) -> None:
        self.members = frozenset(members)
        self._owners: dict[bytes, str | None] = {}
        self._ranks: dict[bytes, list[str]] = {}

    def __repr__(self) -> str:
        return f"Placement({len(self.members)} members, {len(self._owners)} chunks placed)"

    def owner(self, cid: bytes) -> str | None:
        got = self._owners.get(cid, "")
        if got == "":
            if len(self._owners) >= 1 << 16:
                self._owners.clear()
            got = self._owners[cid] = owner(cid, self.members)
        return got

    def rank(self, cid: bytes) -> list[str]:
        """Every member, best first for `cid` (remembered, like owners)."""
        got = self._ranks.get(cid)
        if got is None:
            if len(self._ranks) >= 1 << 12:
                self._ranks.clear()
            got = self._ranks[cid] = rank(cid, self.members)
        return got

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
    of every chunk it fetches, and the set changes far less often than that. A placement
    for a slightly different set is derived from this one (`derive`) without weighing every
    member again: a member added takes a chunk only if it outweighs the chunk's owner, and a
    member removed gives up only the chunks it owned."""

    def __init__(self, members: Iterable[str]) -> None:
        self.members = frozenset(members)
        self._best: dict[bytes, tuple[str, int]] = {}  # chunk -> (owner, its weight)
        self._ranks: dict[bytes, list[str]] = {}

    def __repr__(self) -> str:
        return f"Placement({len(self.members)} members, {len(self._best)} chunks placed)"

    def owner(self, cid: bytes) -> str | None:
        got = self._best.get(cid)
        if got is None:
            if not self.members:
                return None
            if len(self._best) >= 1 << 16:
                self._best.clear()
            w, m = min((-weight(m, cid), m) for m in self.members)
            got = self._best[cid] = (m, -w)
        return got[0]

    def rank(self, cid: bytes) -> list[str]:
        """Every member, best first for `cid` (remembered, like owners)."""
        got = self._ranks.get(cid)
        if got is None:
            if len(self._ranks) >= 1 << 12:
                self._ranks.clear()
            got = self._ranks[cid] = rank(cid, self.members)
        return got

    def derive(self, members: Iterable[str]) -> Placement:
        """The placement over `members`, reusing what this one knows."""
        new = Placement(members)
        added = new.members - self.members
        removed = self.members - new.members
        if len(added) > 8:
            return new  # a new fleet, more or less: weigh afresh, lazily
        for cid, (m, w) in self._best.items():
            if m in removed:
                continue  # placed again when asked
            for a in added:
                wa = weight(a, cid)
                if (-wa, a) < (-w, m):
                    m, w = a, wa
            new._best[cid] = (m, w)
        return new

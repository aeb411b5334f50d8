"""Eviction choice: which blobs leave a tier so that it fits its budget. Pure.

The order is least recently used first, and of equally old ones the biggest first (fewer
victims). `choose_victims` applies it to a list of candidates; `Lru` keeps one tier's
entries in that order as they come, go and are used, so a choice costs O(v log n) for v
victims instead of a sort of the whole tier, and holds no Python object per entry.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Candidate(Generic[K]):
    key: K
    size: int
    last_used: float


def choose_victims(candidates: Sequence[Candidate[K]], need: int) -> list[K] | None:
    """Least recently used first, until at least `need` bytes are freed.

    `candidates` holds only what may go (not pinned, not in use). None when even all of them
    would not free enough: the caller then tries another tier instead of evicting for nothing.
    """
    return take(sorted(candidates, key=lambda c: (c.last_used, -c.size)), need)


def take(ordered: Iterable[Candidate[K]], need: int) -> list[K] | None:
    """The first of `ordered` that together free `need` bytes; None if all of them do not."""
    if need <= 0:
        return []
    chosen: list[K] = []
    freed = 0
    for c in ordered:
        chosen.append(c.key)
        freed += c.size
        if freed >= need:
            return chosen
    return None


# The heap's second key: equally old entries go biggest first, then first pushed first. A
# charge is counted up to 1 TiB in it (bigger ones tie on size) and the push ticket modulo 2**23.
_CBITS, _TBITS = 40, 23
_CMAX = (1 << _CBITS) - 1
_TMASK = (1 << _TBITS) - 1
_ARITY = 4  # a 4-ary heap: half the levels of a binary one, for Python's cost per level


class Charges(Protocol):
    """Each slot's charge, by slot: an array, or blobs.Charged."""

    def __getitem__(self, slot: int, /) -> int: ...


class Lru:
    """One tier's evictable entries, least recently used first (equally old: the biggest
    first), by slot: the caller's small-int handle for an entry, whose `last_used` and
    `charged` it keeps in its own columns, which the Lru reads.

    A 4-ary heap held in `array` columns (its keys and the slots), plus each slot's place in
    it: ~24 bytes an entry and no Python object per entry. push is O(log n) (O(1) for the
    newest entry, the usual case), drop O(log n). A use (a newer `last_used`) costs nothing
    until a walk meets the entry and moves it; `charged` must not change while queued (drop,
    change, push). `bytes` is the sum of what the queued entries are charged; `walked`
    counts the entries walks have looked at (tests count work with it).
    """

    def __init__(self, last_used: Sequence[float], charged: Charges) -> None:
        self._last_used = last_used
        self._charged = charged
        self._t = array("d")  # the last use an entry was queued with
        self._x = array("q")  # the second key (size, then push order)
        self._s = array("i")  # the entry's slot
        self._pos = array("i")  # a slot's place in the heap; -1: not queued
        self._tickets = 0
        self.count = 0
        self.bytes = 0
        self.walked = 0

    def __repr__(self) -> str:
        return f"Lru({self.count} entries, {self.bytes} bytes)"

    def __len__(self) -> int:
        return self.count

    def queued(self, slot: int) -> bool:
        return slot < len(self._pos) and self._pos[slot] >= 0

    def push(self, slot: int) -> None:
        """Queue `slot` (nothing if it is queued already)."""
        pos = self._pos
        if slot >= len(pos):
            pos.extend(array("i", [-1]) * (slot + 1 - len(pos)))
        elif pos[slot] >= 0:
            return
        charged = self._charged[slot]
        self._tickets += 1
        second = (_CMAX - min(charged, _CMAX)) << _TBITS | (self._tickets & _TMASK)
        n = len(self._s)
        self._t.append(self._last_used[slot])
        self._x.append(second)
        self._s.append(slot)
        pos[slot] = n
        self._up(n)
        self.count += 1
        self.bytes += charged

    def drop(self, slot: int) -> None:
        """Take `slot` out of the queue (nothing if it is not queued)."""
        if slot >= len(self._pos) or (i := self._pos[slot]) < 0:
            return
        self._remove(i)
        self.count -= 1
        self.bytes -= self._charged[slot]

    def order(self) -> list[int]:
        """The queued slots in eviction order, as queued (tests; O(n log n))."""
        return [s for _, _, s in sorted(zip(self._t, self._x, self._s, strict=True))]

    def victims(self, need: int, keep: Callable[[int], bool]) -> list[int] | None:
        """The least recently used entries (equally old: the biggest first) that together
        free `need` bytes, or None if all the others would not (nothing is taken then).

        An entry `keep` says must stay (pinned, in use) is dropped from the queue on the
        way, so later walks do not meet it again: the caller pushes it back once it may go.
        The victims stay queued until the caller drops them (it may not evict them all).
        """
        if need <= 0:
            return []
        # Taken off the heap while the walk goes on, still counted as queued, and put back
        # as they were however the walk ends.
        chosen: list[tuple[int, float, int]] = []
        freed = 0
        t, x, s = self._t, self._x, self._s
        try:
            while freed < need:
                if self.bytes < need or not s:
                    return None  # what is left, the chosen included, is not enough
                slot = s[0]
                self.walked += 1
                used = self._last_used[slot]
                if t[0] != used:  # used since it was queued: move it
                    t[0], x[0] = used, self._second(self._charged[slot])
                    self._down(0)
                    continue
                if keep(slot):
                    self.drop(slot)
                    continue
                chosen.append((slot, t[0], x[0]))
                freed += self._charged[slot]
                self._remove(0)
            return [c[0] for c in chosen]
        finally:
            for slot, used, second in chosen:
                self._append(slot, used, second)

    # the heap -----------------------------------------------------------------------------
    def _second(self, charged: int) -> int:
        self._tickets += 1
        return (_CMAX - min(charged, _CMAX)) << _TBITS | (self._tickets & _TMASK)

    def _append(self, slot: int, used: float, second: int) -> None:
        n = len(self._s)
        self._t.append(used)
        self._x.append(second)
        self._s.append(slot)
        self._pos[slot] = n
        self._up(n)

    def _remove(self, i: int) -> None:
        """Take the entry at `i` off the heap (its slot: not queued)."""
        t, x, s, pos = self._t, self._x, self._s, self._pos
        pos[s[i]] = -1
        lt, lx, ls = t.pop(), x.pop(), s.pop()
        if i == len(s):
            return
        t[i], x[i], s[i] = lt, lx, ls
        pos[ls] = i
        self._up(i)
        if pos[ls] == i:
            self._down(i)

    def _up(self, i: int) -> None:
        t, x, s, pos = self._t, self._x, self._s, self._pos
        et, ex, es = t[i], x[i], s[i]
        while i > 0:
            p = (i - 1) // _ARITY
            pt = t[p]
            if pt < et or (pt == et and x[p] <= ex):
                break
            t[i], x[i], s[i] = pt, x[p], s[p]
            pos[s[i]] = i
            i = p
        t[i], x[i], s[i] = et, ex, es
        pos[es] = i

    def _down(self, i: int) -> None:
        t, x, s, pos = self._t, self._x, self._s, self._pos
        n = len(s)
        et, ex, es = t[i], x[i], s[i]
        while (c := _ARITY * i + 1) < n:
            # the least of the (up to four) children, unrolled: this loop is the hot one
            m, mt, mx = c, t[c], x[c]
            j = c + 1
            if j < n:
                if (jt := t[j]) < mt or (jt == mt and x[j] < mx):
                    m, mt, mx = j, jt, x[j]
                j += 1
                if j < n:
                    if (jt := t[j]) < mt or (jt == mt and x[j] < mx):
                        m, mt, mx = j, jt, x[j]
                    j += 1
                    if j < n and ((jt := t[j]) < mt or (jt == mt and x[j] < mx)):
                        m, mt, mx = j, jt, x[j]
            if et < mt or (et == mt and ex <= mx):
                break
            t[i], x[i], s[i] = mt, mx, s[m]
            pos[s[i]] = i
            i = m
        t[i], x[i], s[i] = et, ex, es
        pos[es] = i

    def nbytes(self) -> int:
        """What the queue holds in buffers (an estimate of its memory, for tests)."""
        return 8 * len(self._t) + 8 * len(self._x) + 4 * len(self._s) + 4 * len(self._pos)

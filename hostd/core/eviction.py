"""Eviction choice: which blobs leave a tier so that it fits its budget. Pure."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

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
    if need <= 0:
        return []
    chosen: list[K] = []
    freed = 0
    for c in sorted(candidates, key=lambda c: (c.last_used, -c.size)):
        chosen.append(c.key)
        freed += c.size
        if freed >= need:
            return chosen
    return None

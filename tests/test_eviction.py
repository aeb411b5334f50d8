"""Eviction choice: least recently used first, just enough to free what is needed, or None."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core.eviction import Candidate, choose_victims

_candidates = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), max_size=12).map(
    lambda xs: [Candidate(key=i, size=s, last_used=float(t)) for i, (s, t) in enumerate(xs)]
)


def _freed(cands: list[Candidate[int]], keys: list[int]) -> int:
    by_key = {c.key: c for c in cands}
    return sum(by_key[k].size for k in keys)


@settings(max_examples=300, deadline=None)
@given(_candidates, st.integers(-5, 6000))
def test_victims_free_enough_lru_first_and_no_more_than_needed(
    cands: list[Candidate[int]], need: int
) -> None:
    victims = choose_victims(cands, need)
    total = sum(c.size for c in cands)
    if need <= 0:
        assert victims == []
        return
    if total < need:
        assert victims is None  # evicting everything would still not make room
        return
    assert victims is not None
    assert len(set(victims)) == len(victims)
    by_key = {c.key: c for c in cands}
    assert set(victims) <= set(by_key)
    # Frees at least `need`...
    assert _freed(cands, victims) >= need
    # ...and no more victims than needed: without the last one it would not be enough.
    assert _freed(cands, victims[:-1]) < need
    # Least recently used first, and nothing kept is older than something evicted.
    times = [by_key[k].last_used for k in victims]
    assert times == sorted(times)
    kept = [c.last_used for c in cands if c.key not in set(victims)]
    assert not kept or max(times) <= min(kept)


@settings(max_examples=100, deadline=None)
@given(_candidates, st.integers(1, 6000))
def test_input_order_does_not_change_what_is_freed(cands: list[Candidate[int]], need: int) -> None:
    a = choose_victims(cands, need)
    b = choose_victims(cands[::-1], need)
    if a is None or b is None:
        assert a is b is None
    else:
        assert (len(a), _freed(cands, a)) == (len(b), _freed(cands, b))


CANDS = [
    Candidate("a", 10, last_used=3.0),
    Candidate("b", 20, last_used=1.0),
    Candidate("c", 30, last_used=2.0),
]


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        (0, []),
        (-1, []),
        (1, ["b"]),
        (20, ["b"]),
        (21, ["b", "c"]),
        (50, ["b", "c"]),
        (51, ["b", "c", "a"]),
        (60, ["b", "c", "a"]),
        (61, None),
    ],
)
def test_examples(need: int, expected: list[str] | None) -> None:
    assert choose_victims(CANDS, need) == expected


def test_nothing_to_evict() -> None:
    assert choose_victims([], 1) is None
    assert choose_victims([], 0) == []


def test_equally_old_blobs_go_biggest_first() -> None:
    cands = [Candidate("small", 1, 5.0), Candidate("big", 100, 5.0), Candidate("newer", 500, 6.0)]
    assert choose_victims(cands, 50) == ["big"]
    assert choose_victims(cands, 101) == ["big", "small"]

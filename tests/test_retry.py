"""RetryPolicy: full-jitter exponential backoff, pure and replayable."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostd.core.retry import RetryPolicy


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0, max_value=10, allow_nan=False),
    cap=st.floats(min_value=0, max_value=600, allow_nan=False),
    seed=st.integers(),
)
def test_delay_stays_within_the_jitter_window(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    policy = RetryPolicy(attempts=5, base=base, cap=cap)
    delay = policy.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** min(attempt, 62))


def test_window_doubles_until_the_cap() -> None:
    policy = RetryPolicy(attempts=10, base=0.1, cap=1.0)
    # With the rng's top value forced, the delay is the window itself.
    top = _MaxRandom()
    assert [round(policy.delay(a, top), 6) for a in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_same_seed_same_delays_and_no_global_random() -> None:
    policy = RetryPolicy(attempts=4, base=0.5, cap=30.0)
    random.seed(1)
    first = [policy.delay(a, random.Random(42)) for a in range(8)]
    random.seed(2)  # the module-level generator must play no part
    second = [policy.delay(a, random.Random(42)) for a in range(8)]
    assert first == second
    assert len(set(first)) > 1  # it is jittered, not constant


def test_retries_left_counts_the_first_attempt() -> None:
    policy = RetryPolicy(attempts=3, base=0.1, cap=1.0)
    assert [policy.retries_left(a) for a in range(4)] == [True, True, False, False]
    assert not RetryPolicy(attempts=1, base=0.1, cap=1.0).retries_left(0)


@pytest.mark.parametrize(
    ("attempts", "base", "cap"),
    [(0, 0.1, 1.0), (3, -0.1, 1.0), (3, 0.1, -1.0), (3, float("nan"), 1.0)],
)
def test_bad_policies_are_refused(attempts: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="retry"):
        RetryPolicy(attempts=attempts, base=base, cap=cap)


def test_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match="attempt"):
        RetryPolicy(attempts=3, base=0.1, cap=1.0).delay(-1, random.Random(0))


def test_policy_is_frozen_and_hashable() -> None:
    policy = RetryPolicy(attempts=3, base=0.1, cap=1.0)
    assert policy == RetryPolicy(attempts=3, base=0.1, cap=1.0)
    assert hash(policy) == hash(RetryPolicy(attempts=3, base=0.1, cap=1.0))
    with pytest.raises(AttributeError):
        policy.attempts = 4  # type: ignore[misc]


class _MaxRandom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b

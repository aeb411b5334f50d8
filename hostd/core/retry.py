"""Retry backoff: how long to wait before the next attempt of a failed request.

Full-jitter exponential backoff (AWS architecture blog, "Exponential Backoff and Jitter"):
the wait before retry number `attempt` is uniform in [0, min(cap, base * 2**attempt)].
Jitter spreads the retries of many hosts that failed together (a bucket that throttled a
whole fleet's scale-up) instead of bringing them back in lockstep.

Pure: no I/O, no clock, no global random state. The caller passes the `random.Random` and
does the sleeping, so tests can replay delays exactly. This module must not decide *whether*
a failure is worth retrying; that is the I/O edge's knowledge (origin.py knows its errors).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2**62 times any sane base already exceeds every cap; clamping the exponent keeps the
# arithmetic in range for absurd attempt numbers instead of raising OverflowError.
_MAX_EXPONENT = 62


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (the first one included); backoff `base` and `cap` in seconds."""

    attempts: int
    base: float
    cap: float

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, got {self.attempts}")
        if not self.base >= 0 or not self.cap >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"retry base and cap must be >= 0, got {self.base}, {self.cap}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number `attempt` (0 for the first one)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        ceiling = min(self.cap, self.base * 2 ** min(attempt, _MAX_EXPONENT))
        return rng.uniform(0.0, ceiling)

    def retries_left(self, attempt: int) -> bool:
        """Whether another attempt follows failed attempt number `attempt` (0-based)."""
        return attempt + 1 < self.attempts

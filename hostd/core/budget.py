"""A tier's budget at start: what its config asks for, capped by what its filesystem can give.

A share ("50%") is of the filesystem's size, which says nothing of what else lives there: on
a disk 80% full, "50%" would promise the cache bytes that do not exist, and the cache would
fill the disk before eviction ever starts. So a share is capped by the space free when the
daemon starts, counting the bytes the tier already holds as free (they are the cache's own),
and leaving HEADROOM of the filesystem free for everyone else. An explicit size ("64GiB") is
the operator's decision and is honoured as given, with a warning when the filesystem cannot
hold it.

Pure: the caller measures the filesystem (statvfs) and the tier's usage; this module decides
and says why, in words for the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from hostd.core.units import PERCENT_RE

HEADROOM = Fraction(1, 10)  # of the filesystem's size, kept free when a share is capped


@dataclass(frozen=True)
class Space:
    """A filesystem as statvfs sees it, in bytes."""

    size: int  # f_blocks * f_frsize
    free: int  # f_bavail * f_frsize: what an unprivileged writer may still use


@dataclass(frozen=True)
class Budget:
    """The budget chosen for a tier, and why (one sentence for the log)."""

    bytes: int
    reason: str
    capped: bool = False  # a share cut down to the free space
    warning: str | None = None  # a size the filesystem cannot hold, a cap below the tier's use


def choose(
    spec: str, configured: int, space: Space, used: int, *, headroom: Fraction = HEADROOM
) -> Budget:
    """The budget of a tier whose config says `spec`, resolved to `configured` bytes (a share
    of space.size, or a size), on a filesystem with `space`, holding `used` bytes already."""
    available = space.free + used  # what the tier could hold if nothing else wrote there
    if PERCENT_RE.fullmatch(spec) is None:
        warning = None
        if configured > available:
            warning = (
                f"is more than its filesystem can give ({iec(space.free)} free there plus the "
                f"{iec(used)} the tier holds): writes will fail with 'no space left' before "
                "the budget makes eviction start"
            )
        return Budget(configured, f"{spec.strip()} as configured", warning=warning)
    keep = math.ceil(space.size * headroom)
    cap = max(0, available - keep)
    if configured <= cap:
        return Budget(
            configured,
            f"{spec.strip()} of the {iec(space.size)} filesystem ({iec(space.free)} free "
            f"there, plus the {iec(used)} the tier holds)",
        )
    return Budget(
        cap,
        f"{spec.strip()} of the {iec(space.size)} filesystem would be {iec(configured)}, "
        f"more than it can give: {iec(space.free)} free plus the {iec(used)} the tier holds, "
        f"less {iec(keep)} ({float(headroom):.0%} of the filesystem) kept free",
        capped=True,
        warning=(
            f"is below the {iec(used)} the tier holds: it evicts down to it (free space on "
            "that filesystem, or give the tier a size)"
            if cap < used
            else None
        ),
    )


def iec(n: int) -> str:
    """Bytes for a log line: "80.0 GiB", "512 B"."""
    amount, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(amount) < 1024 or unit == "PiB":
            break
        amount /= 1024
    return f"{n} B" if unit == "B" else f"{amount:.1f} {unit}"

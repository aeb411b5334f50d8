"""Choosing snapshots: ids by unique prefix, what a prune drops, when a publish must be forced.

Pure: every function takes plain values and returns a decision (or raises the usage error a
user reads); the daemon gathers the inputs and carries the decision out (hostd/prune.py,
hostd/refs.py, hostd/publish.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hostd.errors import NotFound, UsageError

MIN_PREFIX = 4  # hex digits: shorter matches too much to be meant
_HEX = re.compile(r"[0-9a-f]+")
_SHOWN = 10  # candidates named in an ambiguity error


def looks_like_id(text: str) -> bool:
    """Whether `text` may be a snapshot id or a prefix of one: lowercase hex, at most 64."""
    return 0 < len(text) <= 64 and _HEX.fullmatch(text) is not None


def match_id(text: str, known: Iterable[str], *, what: str = "snapshot") -> str:
    """The one id among `known` that `text` is a prefix of (a full 64-hex id is itself).

    Too short, not hex, or ambiguous is a UsageError naming the candidates; no match is
    NotFound. A full id is returned even if `known` lacks it: the caller may find it
    elsewhere (the origin)."""
    if len(text) == 64 and looks_like_id(text):
        return text
    if not looks_like_id(text):
        raise UsageError(f"{what} id {text!r} is not lowercase hex (a full id or a prefix)")
    if len(text) < MIN_PREFIX:
        raise UsageError(
            f"{what} id prefix {text!r} is too short: give at least {MIN_PREFIX} hex digits"
        )
    found = sorted({k for k in known if k.startswith(text)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"no {what} id starting with {text!r} is known on this host")
    shown = ", ".join(found[:_SHOWN]) + (
        f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    )
    raise UsageError(f"{what} id prefix {text!r} is ambiguous: it matches {shown}")


# -- prune ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A snapshot this host knows, as a prune sees it. `refs`: each ref this host resolved to
    it, with when it last did (epoch seconds)."""

    id: str
    last_used: float
    pinned: bool
    bytes: int
    refs: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Verdict:
    id: str
    drop: bool
    why: str  # for a person: which policy kept or dropped it


def prune_plan(
    snapshots: Sequence[Candidate], *, keep: int | None, unused_for: float | None, now: float
) -> list[Verdict]:
    """What `prune` does with each snapshot, in the order given.

    `keep`: each ref keeps the `keep` snapshots it was most recently resolved to; a snapshot
    no ref names is not judged by it. `unused_for`: a snapshot not used for that many seconds
    may go. With both, a snapshot goes only when both let it go (beyond its refs' newest
    `keep`, and unused that long). A pinned snapshot always stays."""
    if keep is None and unused_for is None:
        # (the API's words: the CLI says this in its own before it asks)
        raise UsageError("say what to prune: fields 'keep', 'unused_for', or both")
    if keep is not None and keep < 0:
        raise UsageError(f"--keep must be 0 or more, got {keep}")
    if unused_for is not None and unused_for < 0:
        raise UsageError("--unused-for must not be negative")
    kept_by: dict[str, str] = {}
    if keep is not None:
        per_ref: dict[str, list[Candidate]] = {}
        for s in snapshots:
            for ref in s.refs:
                per_ref.setdefault(ref, []).append(s)
        for ref, group in sorted(per_ref.items()):
            group.sort(key=lambda s, r=ref: (-s.refs[r], -s.last_used, s.id))  # type: ignore[misc]
            for rank, s in enumerate(group[:keep], 1):
                kept_by.setdefault(s.id, f"newest {rank} of ref {ref}")
    out: list[Verdict] = []
    for s in snapshots:
        if s.pinned:
            out.append(Verdict(s.id, False, "pinned (unpin it to let prune drop it)"))
            continue
        votes: list[tuple[bool, str]] = []  # one per policy that judges it: (drop?, why)
        if keep is not None:
            if s.id in kept_by:
                votes.append((False, kept_by[s.id]))
            elif s.refs:
                votes.append((True, f"older than the newest {keep} of {', '.join(sorted(s.refs))}"))
        if unused_for is not None:
            idle = now - s.last_used
            votes.append(
                (
                    idle >= unused_for,
                    f"{'unused for' if idle >= unused_for else 'used'} "
                    f"{_ago(idle)}{'' if idle >= unused_for else ' ago'}",
                )
            )
        if not votes:
            out.append(Verdict(s.id, False, "no ref names it (--keep judges ref targets only)"))
            continue
        out.append(Verdict(s.id, all(d for d, _ in votes), "; ".join(w for _, w in votes)))
    return out


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


# -- publish guard ----------------------------------------------------------------------------


def shrink_refusal(
    *, files: int, symlinks: int, size: int, before: tuple[int, int] | None
) -> str | None:
    """Why a publish must not move its ref without `force`, or None.

    An empty tree (no files, no symlinks) is refused outright: a typo'd path would empty a
    ref. So is a tree with fewer than half the files or bytes of the ref's current snapshot
    under the same compat key (`before`: its files and bytes)."""
    if files == 0 and symlinks == 0:
        return "the directory is empty (no files or symlinks)"
    if before is None:
        return None
    old_files, old_bytes = before
    if old_files and files * 2 < old_files:
        return f"it has {files} files, fewer than half of the {old_files} the ref has now"
    if old_bytes and size * 2 < old_bytes:
        return f"it holds {size} bytes, less than half of the {old_bytes} the ref has now"
    return None


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """`--unused-for`: a number and a unit, s, m, h, d or w ("90m", "7d"), in seconds."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"{text!r} is not a duration: a number and s, m, h, d or w, e.g. 7d")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]
